"""ReLoRA's lr schedule and the order of its updates, merges and optimizer resets, transcribed from
the authors' code: Guitaricet/relora@176f37633fe02019835387258ddabcf6d91e328d (`REPO`), files
peft_pretraining/training_utils.py (`TU`), torchrun_main.py (`MAIN`) and README.md; and its
`ReLoRaLinear` as torchrun_main.py wraps the model (peft_pretraining/relora.py, `RELORA`), in torch
(the `parity` extra).

A ReLoRA run is two runs of torchrun_main.py (README.md:47-89): a full-rank warm start (`--scheduler
cosine`, the default, over the full `--num_training_steps`, stopped after the warm start's updates,
README.md:65) and a `--warmed_up_model` run, which restores no optimizer or scheduler state
(MAIN:63) and starts a fresh `cosine_restarts` scheduler over the remaining steps (MAIN:679-691).
The schedule in plain Python floats; nothing here imports colax.
"""

import math

REPO = "Guitaricet/relora@176f37633fe02019835387258ddabcf6d91e328d"
TU = f"{REPO}:peft_pretraining/training_utils.py"
MAIN = f"{REPO}:torchrun_main.py"
RELORA = f"{REPO}:peft_pretraining/relora.py"


def cyclical_cosine_lambda(current_step, *, num_warmup_steps, cycle_length, min_lr_ratio):
    """The lr multiplier of `--scheduler cosine` (TU:173-188; cycle_length = num_training_steps when
    not given, TU:106-107)."""
    assert 0 < min_lr_ratio <= 1.0                                       # TU:174
    cycle_step = current_step % cycle_length                             # TU:177
    if cycle_step < num_warmup_steps:                                    # TU:179
        if current_step != cycle_step:                                   # TU:180
            if cycle_step < 2:                                           # TU:181
                return 1e-7                                              # TU:182
        return float(cycle_step) / float(max(1, num_warmup_steps))       # TU:183
    progress = float(cycle_step - num_warmup_steps) / float(max(1, cycle_length - num_warmup_steps))  # TU:185
    cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))            # TU:186
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay            # TU:188


def multiple_warmups_lambda(current_step, *, num_training_steps, first_warmup_steps, restart_warmup_steps,
                            restart_every, min_lr_ratio, adjust_step=0):
    """The lr multiplier of `--scheduler cosine_restarts` (TU:191-236)."""
    assert 0 < min_lr_ratio <= 1.0                                       # TU:208
    assert restart_every > 0                                             # TU:209
    assert adjust_step + first_warmup_steps <= num_training_steps        # TU:210
    assert adjust_step + first_warmup_steps <= restart_every             # TU:211
    if current_step < first_warmup_steps:                                # TU:213
        return float(current_step) / float(max(1, first_warmup_steps))   # TU:214
    _current_step = current_step + adjust_step                           # TU:216
    restart_step = _current_step % restart_every                         # TU:218
    restart_number = _current_step // restart_every                      # TU:219
    if restart_step < restart_warmup_steps and current_step >= restart_every:  # TU:221
        end_of_warmup_progress = (                                       # TU:223
            float(restart_number * restart_every + restart_warmup_steps - first_warmup_steps)  # TU:224
            / float(max(1, num_training_steps - first_warmup_steps)))    # TU:225
        _cosine_decay = 0.5 * (1.0 + math.cos(math.pi * end_of_warmup_progress))  # TU:228
        warmup_lr_multiplier = min_lr_ratio + (1.0 - min_lr_ratio) * _cosine_decay  # TU:229
        return float(restart_step) / float(max(1, restart_warmup_steps)) * warmup_lr_multiplier  # TU:231
    progress = (float(_current_step - first_warmup_steps)                # TU:233
                / float(max(1, num_training_steps - first_warmup_steps)))
    cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))            # TU:234
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay            # TU:236


def run(*, num_training_steps, warm_start_steps, warm_start_lr, warm_start_warmup, lr, warmup_steps, relora,
        restart_warmup_steps, min_lr_ratio):
    """The lr of every update of a ReLoRA run, and what happens after each.

    The warm-start run: `--lr warm_start_lr --warmup_steps warm_start_warmup --num_training_steps
    num_training_steps`, stopped after `warm_start_steps` updates (README.md:52-65); then the
    `--warmed_up_model` run: `--lr lr --warmup_steps warmup_steps --relora relora --cycle_length relora
    --restart_warmup_steps restart_warmup_steps --scheduler cosine_restarts --reset_optimizer_on_relora
    True` (README.md:71-88), with one gradient-accumulation step per update.
    Returns (lrs, events): lrs[u - 1] the lr of update u (1-based, counted over both runs, as
    update_step counts on, MAIN:517); events: [(u, "fresh optimizer" | "merge" | "optimizer reset")] in
    the order they happen after update u.
    """
    lrs, events = [], []
    # torch's LambdaLR sets lr = base * lambda(0) at construction and lambda(k) after its k-th step();
    # MAIN:814-815 calls optimizer.step() then scheduler.step(), so local update j uses lambda(j - 1).
    for j in range(1, warm_start_steps + 1):  # the warm-start run: update_step 0 (MAIN:499), no restarts
        lrs.append(warm_start_lr * cyclical_cosine_lambda(
            j - 1, num_warmup_steps=warm_start_warmup, cycle_length=num_training_steps,  # MAIN:682-691, TU:78-86
            min_lr_ratio=min_lr_ratio))
    events.append((warm_start_steps, "fresh optimizer"))  # a new AdamW (MAIN:666) and scheduler (MAIN:682)
    update_step = warm_start_steps                                       # MAIN:517
    scheduler_start_step = update_step                                   # MAIN:679
    _scheduler_steps = num_training_steps - scheduler_start_step          # MAIN:680
    local_step = 0                                                       # MAIN:751
    while update_step < num_training_steps:                              # MAIN:778
        local_step += 1                                                  # MAIN:770 (gradient_accumulation 1)
        lrs.append(lr * multiple_warmups_lambda(                         # MAIN:682-691, TU:87-98
            local_step - 1, num_training_steps=_scheduler_steps, first_warmup_steps=warmup_steps,
            restart_warmup_steps=restart_warmup_steps, restart_every=relora, min_lr_ratio=min_lr_ratio))
        update_step += 1                                                 # MAIN:814-825: the update, then +1
        can_reset_relora = local_step // 1 >= relora                     # MAIN:874-877
        if can_reset_relora and (update_step - scheduler_start_step) % relora == 1:  # MAIN:879
            events.append((update_step, "merge"))                        # MAIN:886, relora.py:144-147
        can_reset_optimizer = local_step // 1 >= relora                  # MAIN:895-898 (cycle_length = relora)
        if can_reset_optimizer and (update_step - scheduler_start_step) % relora == 1:  # MAIN:900
            events.append((update_step, "optimizer reset"))              # MAIN:905-912 (A and B only, MAIN:907)
    return lrs, events


class ReLoRaLinear:
    """One `ReLoRaLinear` (RELORA:181-323) as torchrun_main.py wraps a projection of the (warmed-up)
    model: `ReLoRaModel(..., keep_original_weights=True)` (MAIN:542-553, True in every run), with
    --relora (lora_only False, MAIN:533-536), no quantization, no trainable scaling, no bias (LLaMA's
    projections have none). W [out, in] is the wrapped weight; A [r, in] and B [out, r] the factors."""

    def __init__(self, torch, weight, r, lora_alpha):
        out_features, in_features = weight.shape
        self.torch = torch
        self.weight = weight.clone()                                        # RELORA:101, 116, 223 (frozen)
        self.lora_A = torch.nn.Linear(in_features, r, bias=False)           # RELORA:250
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # RELORA:251
        self.lora_B = torch.nn.Linear(r, out_features, bias=False)          # RELORA:252
        torch.nn.init.zeros_(self.lora_B.weight)                            # RELORA:253
        self.scaling = lora_alpha / r                                       # RELORA:257
        torch.nn.init.zeros_(self.lora_A.weight)                            # keep_original_weights, RELORA:120-122

    def forward(self, x):
        """RELORA:319-323, without dropout."""
        result = self.torch.nn.functional.linear(x, self.weight)           # RELORA:319
        return result + self.lora_B(self.lora_A(x)) * self.scaling          # RELORA:322

    def merge_and_reinit(self):
        """RELORA:269-307 (not quantized, no trainable scaling)."""
        with self.torch.no_grad():
            self.weight += self.lora_B.weight @ self.lora_A.weight * self.scaling  # RELORA:276
            self.torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # RELORA:303
            self.torch.nn.init.zeros_(self.lora_B.weight)                     # RELORA:305
