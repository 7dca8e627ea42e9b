"""SwitchLoRA's switch step and its per-row-step AdamW as the authors' code computes them, in torch
(the `parity` extra).

Transcribed from asfsdsf/SwitchLoRA@f9a174e862beaa4550e44e6b1e9913a55df55412 (cited as `SL@f9a174e:path:line`), with the defaults of
its 350M script: `_CONTINUOUS_SWITCH = True`, `_ZERO_SWITCH_STATE = _ZERO_SWITCH_STEP_STATE = True`,
`_ADAM_WARM_STEP = 5`, `_CANDIDATES_DROP_RATE = 0`, `_ZERO_INIT_B = False`, `_ZERO_ALL_STATE = False`
(SL@f9a174e:switchlora/switch_lora.py:22-38), fan_in_fan_out False, no quantization. One `Layer` is
one SwitchLoraLinear: W [out, in], A [r, in], B [out, r], the candidate lists and the AdamW state of
A and B (`StepAdamW`). The number of vectors each layer switches is injected (`update`) or drawn by
the transcription of `_get_switch_replace_num` (`get_switch_replace_num`, with a seeded numpy
RandomState for their global `numpy.random`); the cap `available_num` is transcribed.
"""

import math

ADAM_WARM_STEP = 5  # SL@f9a174e:switchlora/switch_lora.py:22


class Layer:
    """A SwitchLoraLinear's state after `_init_candidates` and `layer2lora` (SL@f9a174e:switchlora/
    switch_lora.py:660-717, switchlora/lora_utils.py:62-70), given W0 [out, in] and the candidate
    tensors [C, in], [C, out] (drawn by colax: U(±bound) as switch_lora.py:182-184)."""

    def __init__(self, torch, w0, candidates_a, candidates_b, rank, alpha):
        self.torch, self.r, self.scaling = torch, rank, alpha / rank  # loralib: scaling = alpha / r
        n = candidates_a.shape[0]  # candidate_num = min(in, out), switch_lora.py:682
        self.candidates_a, self.candidates_b = candidates_a.clone(), candidates_b.clone()
        self.selected_a = list(range(n - rank, n))  # _init_orthogonal_lora, switch_lora.py:189-190
        selected_b = list(range(n - rank, n))
        self.candidate_a_index = 0  # switch_lora.py:696
        self.candidate_b_index = rank // 2  # switch_lora.py:699
        self.selected_b = [selected_b[i - rank // 2] for i in range(rank)]  # switch_lora.py:701
        self.fixed_a, self.fixed_b = [0] * rank, [0] * rank  # switch_lora.py:688-689
        self.a = torch.stack([self.candidates_a[i] for i in self.selected_a])  # switch_lora.py:714-715
        self.b = torch.stack([self.candidates_b[i] for i in self.selected_b], dim=1)  # switch_lora.py:716-717
        self.w = w0.clone() - (self.b @ self.a) * self.scaling  # lora_utils.py:69-70
        self.opt = {"a": adam_state(torch, self.a, "is_lora_A"), "b": adam_state(torch, self.b, "is_lora_B")}

    def switch(self, replace_num):
        """SwitchLoraLayer.switch (switch_lora.py:746-779) with `replace_num` given."""
        fixed_a_num = sum(1 for s in self.fixed_a if s > 0)  # :753
        fixed_b_num = sum(1 for s in self.fixed_b if s > 0)  # :754
        available_num = min((self.candidate_a_index - fixed_a_num - self.candidate_b_index) % self.r,
                            (self.candidate_b_index - fixed_b_num - self.candidate_a_index) % self.r)  # :755-756
        if replace_num > available_num:  # :757-758
            replace_num = available_num
        if replace_num == 0:  # :760-761
            return
        to_replace_a = [i % self.r for i in range(self.candidate_a_index, self.candidate_a_index + replace_num)]  # :766-767
        to_replace_b = [i % self.r for i in range(self.candidate_b_index, self.candidate_b_index + replace_num)]  # :768-769
        self.candidate_a_index = (self.candidate_a_index + replace_num) % self.r  # :770
        self.candidate_b_index = (self.candidate_b_index + replace_num) % self.r  # :771
        replace_a = select_indices(len(self.candidates_a), to_replace_a, self.selected_a)  # :772-773
        # _switch_chosen_indices "A" (:439-446): mat1 = A, mat2 = B, counterpart steps fixed_b
        switch_rows(self.w, self.a, self.candidates_a, self.selected_a, self.b, self.fixed_b, replace_a, self.scaling)
        replace_b = select_indices(len(self.candidates_b), to_replace_b, self.selected_b)  # :775-776
        # "B" (:447-454): the transposes, mat1 = Bᵀ, mat2 = Aᵀ (the new A), counterpart steps fixed_a
        switch_rows(self.w.transpose(0, 1), self.b.transpose(0, 1), self.candidates_b, self.selected_b,
                    self.a.transpose(0, 1), self.fixed_a, replace_b, self.scaling)

    def zero_lora_states(self):
        """SwitchLoraLayer.zero_lora_states (switch_lora.py:835-867): the moments and per-row steps of the
        vectors whose counterpart was just switched (fixed step == _ADAM_WARM_STEP) are zeroed."""
        for name, fixed in (("a", self.fixed_a), ("b", self.fixed_b)):  # :840-841
            for i, step in enumerate(fixed):  # :846
                if step == ADAM_WARM_STEP or step < 0:  # :847
                    state = self.opt[name]
                    index = (i, slice(None)) if name == "a" else (slice(None), i)  # :858-867: A rows, B columns
                    for key in ("exp_avg", "exp_avg_sq", "step"):  # :859-862 / :864-867
                        state[key][index] = 0

    def correct_switched_lora(self, grad_a, grad_b):
        """SwitchLoraLayer.correct_switched_lora (switch_lora.py:798-820): gradients of the held vectors
        zeroed, their counts decremented (the continuous branch :799-803 zeroes the same rows)."""
        for i, step in enumerate(self.fixed_a):  # :805-811
            if step > 0:
                grad_a[i, :] = 0
                self.fixed_a[i] -= 1
        for i, step in enumerate(self.fixed_b):  # :813-819
            if step > 0:
                grad_b[:, i] = 0
                self.fixed_b[i] -= 1


def select_indices(candidate_num, indices_to_replace, current_indices):
    """_select_indices with _CONTINUOUS_SWITCH (SL@f9a174e:switchlora/switch_lora.py:471-475)."""
    mat_index_begin = indices_to_replace[0]  # :472
    candidate_index_begin = current_indices[mat_index_begin - 1] + 1  # :473
    return {index: (candidate_index_begin + i) % candidate_num for i, index in enumerate(indices_to_replace)}  # :474


def switch_rows(weight, mat1, candidates1, selected_indices1, mat2, fixed_steps2, replace_map, scaling):
    """switch_rows (SL@f9a174e:switchlora/switch_lora.py:388-425), in place. The continuous variant
    (`switch_continuous_rows`, :342-386, taken when the rows and entries are contiguous) computes the
    same: W += B[:, rows] (A[rows] - candidates[entries]) · scaling as one product, the same write-back."""
    for mat_index, dest_index in replace_map.items():  # :390
        weight += (mat2[:, None, mat_index] @ (mat1[mat_index, None, :] - candidates1[dest_index])) * scaling  # :392-394
    for mat_index, dest_index in replace_map.items():  # save mat1 value to candidates, :407-417
        candidates1[selected_indices1[mat_index]].copy_(mat1[mat_index, :])  # :409, :417
    for mat_index, dest_index in replace_map.items():  # change lora_A value to candidates, :419-425
        mat1[mat_index, :] = candidates1[dest_index]  # :422
        selected_indices1[mat_index] = dest_index  # :423
        fixed_steps2[mat_index] = ADAM_WARM_STEP  # :425


def adam_state(torch, p, element_wise_step):
    """StepAdamW._init_group's state for a LoRA tensor (SL@f9a174e:switchlora/optimizer.py:150-162 and
    torch's AdamW `_init_group`: zero moments): a step per row of A [r, 1], per column of B [1, r]."""
    shape = (p.shape[0], 1) if element_wise_step == "is_lora_A" else (1, p.shape[1])  # :153-159
    return {"step": torch.zeros(shape), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def adamw_step(torch, p, grad, state, lr, beta1, beta2, eps, weight_decay):
    """_multi_tensor_adamw_element_wise_step for one tensor, capturable False, amsgrad False
    (SL@f9a174e:switchlora/optimizer.py:574-650), in place."""
    state["step"] += 1  # :574-577
    if weight_decay != 0:  # :580-581
        p.mul_(1 - lr * weight_decay)
    state["exp_avg"].lerp_(grad, 1 - beta1)  # :584
    state["exp_avg_sq"].mul_(beta2)  # :586
    state["exp_avg_sq"].addcmul_(grad, grad, value=1 - beta2)  # :587
    bias_correction1 = 1 - beta1 ** state["step"]  # :630
    bias_correction2 = 1 - beta2 ** state["step"]  # :631
    step_size = (lr / bias_correction1) * -1  # :633
    bias_correction2_sqrt = bias_correction2.sqrt()  # :635, _dispatch_sqrt of a tensor
    exp_avg_sq_sqrt = state["exp_avg_sq"].sqrt()  # :644
    exp_avg_sq_sqrt = exp_avg_sq_sqrt / bias_correction2_sqrt  # :646
    exp_avg_sq_sqrt = exp_avg_sq_sqrt + eps  # :647
    exp_avg_sq_sqrt = exp_avg_sq_sqrt / step_size  # :649
    p.addcdiv_(state["exp_avg"], exp_avg_sq_sqrt)  # :650


def clip_grad_norm(torch, grads, max_norm):
    """torch.nn.utils.clip_grad_norm_ as llama/main.py:617-618 calls it (over every trainable
    gradient, before the switch, SL@f9a174e:llama/main.py:617-636): g *= min(1, max / (norm + 1e-6))."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


def update(torch, layers, grads, replace_num, lr, beta1, beta2, eps, weight_decay, max_norm):
    """One update of llama/main.py's loop (SL@f9a174e:llama/main.py:617-637) over `layers`, given the
    gradients [(grad_a, grad_b)] computed before it: clip, `switch_lora.switch_lora` (switch,
    zero_lora_states, correct_switched_lora per layer, switch_lora.py:279-288), `optimizer.step`.
    replace_num: each layer's `_get_switch_replace_num` (one per layer, in `layers`' order)."""
    if max_norm > 0:
        clip_grad_norm(torch, [g for pair in grads for g in pair], max_norm)  # main.py:617-618
    for layer, (grad_a, grad_b), n in zip(layers, grads, replace_num, strict=True):
        layer.switch(n)  # switch_lora.py:286
        layer.zero_lora_states()  # :287
        layer.correct_switched_lora(grad_a, grad_b)  # :288
    for layer, (grad_a, grad_b) in zip(layers, grads):  # main.py:636
        adamw_step(torch, layer.a, grad_a, layer.opt["a"], lr, beta1, beta2, eps, weight_decay)
        adamw_step(torch, layer.b, grad_b, layer.opt["b"], lr, beta1, beta2, eps, weight_decay)


def get_switch_rate(global_step, expect_switch_descend_step):
    """_get_switch_rate with _SWITCH_DESCEND_TYPE "exponential" (SL@f9a174e:switchlora/switch_lora.py:239-253)."""
    x = 0.3 ** (1 / expect_switch_descend_step)  # :248
    value = x ** (global_step + 1)  # :249
    return max(value, 1e-8)  # :253


def get_switch_replace_num(random, select_num, global_step, base_switch_interval, expect_switch_descend_step):
    """_get_switch_replace_num (SL@f9a174e:switchlora/switch_lora.py:256-266), _FIX_SWITCH_LORA_INTERVAL
    False; `random` stands for their `numpy.random` (:7). Called per layer with select_num = r (:752),
    global_step = update_step and expect_switch_descend_step = descent * num_training_steps
    (llama/main.py:629-634), before every update (the first: update_step 0)."""
    interval = base_switch_interval / get_switch_rate(global_step, expect_switch_descend_step)  # :260
    if interval < ADAM_WARM_STEP * 2:  # :261
        raise RuntimeError("Switch interval can not be less than adam warm up steps.")  # :262
    replace_num = select_num / interval  # :263
    replace_num_decimal = replace_num - int(replace_num)  # :264
    return int(replace_num) + (1 if random.random() < replace_num_decimal else 0)  # :265


def get_init_lora_bound(torch, in_features, out_features, rank):
    """lora_utils.get_init_lora_bound, default init type (SL@f9a174e:switchlora/lora_utils.py:375-394)."""
    m, n, r = out_features, in_features, rank  # :381-383
    gain = torch.nn.init.calculate_gain("leaky_relu", param=math.sqrt(5))  # :384
    std_a = ((m ** 0.5 * r) / (n ** (3. / 2))) ** (1. / 4) * gain ** 0.5  # :390
    std_b = (r / (m * n) ** 0.5) ** (1. / 4) * gain ** 0.5  # :391
    return math.sqrt(3.0) * std_a, math.sqrt(3.0) * std_b  # :392-394
