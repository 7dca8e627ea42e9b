"""SLTrain's sparse plus low-rank linear layer as the authors' code computes it, in torch (the `parity` extra).

Transcribed from andyjm3/SLTrain@2335d62c75df9b0f0441604eb04fde21b06693e4 (cited as
`SLTrain@2335d62:path:line`): `splora/splora_linear.py` (SpLoRaLinear: init and forward) and
`sparse-lora/sparse_linear.cpp` (the compiled forward and backward it calls). torch's layout:
lora_A [r, in], lora_B [out, r], the support `di` int64 [nnz] indexes the row-major flattened
[out, in] weight (row o, column i -> o * in + i). No bias: the LLaMA projections it replaces have
none (splora_model.py:79).
"""

import math


def init(torch, in_features, out_features, rank, sp_ratio, generator=None):
    """{"lora_A", "lora_B", "di", "dv"} as SpLoRaLinear.__init__ draws them (SLTrain@2335d62:splora/splora_linear.py)."""
    lora_a = torch.empty(rank, in_features)  # :78
    torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)  # :79
    lora_b = torch.zeros(out_features, rank)  # :80-81
    total = in_features * out_features  # :101-102, shape [out, in]
    nnz = int(sp_ratio * total)  # :103
    di, _ = torch.sort(torch.randperm(total, generator=generator)[:nnz])  # :105-106
    bound = 1 / math.sqrt(in_features)  # :110
    dv = torch.empty(nnz).uniform_(-bound, bound, generator=generator)  # :109-111
    return {"lora_A": lora_a, "lora_B": lora_b, "di": di, "dv": dv}


def dense_weight(torch, lora_b, lora_a, dv, di):
    """W [out, in] = lora_B @ lora_A with dv scatter-added at di (SLTrain@2335d62:sparse-lora/sparse_linear.cpp:17-18, :42-44)."""
    w = lora_b.mm(lora_a)
    w.reshape(-1).scatter_add_(0, di.to(torch.int64), dv)
    return w


def backward(torch, g, x, lora_b, lora_a, dv, di):
    """sparse_linear_backward (SLTrain@2335d62:sparse-lora/sparse_linear.cpp:42-67): grads of
    (input, lora_B, lora_A as passed in, i.e. scaled, dv) from the output's gradient g [..., out]."""
    w = dense_weight(torch, lora_b, lora_a, dv, di)  # :42-44
    g2 = g.reshape(-1, g.shape[-1])  # :47
    grad_x = g2.mm(w).view_as(x)  # :50
    weight_grad = g2.t().mm(x.reshape(-1, x.shape[-1]))  # :52-53
    grad_b = weight_grad.mm(lora_a.t())  # :56
    grad_a = lora_b.t().mm(weight_grad)  # :59
    grad_dv = weight_grad.view(-1).gather(0, di.to(torch.int64))  # :62
    return grad_x, grad_b, grad_a, grad_dv


def function(torch):
    """The autograd Function lora_sparse_linear (SLTrain@2335d62:splora/splora_linear.py:11-32) over
    the transcribed forward (sparse_linear.cpp:17-23, no bias) and backward."""

    class LoraSparseLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lora_b, lora_a, dv, di):
            ctx.save_for_backward(x, lora_b, lora_a, dv, di)  # :14
            return torch.nn.functional.linear(x, dense_weight(torch, lora_b, lora_a, dv, di))  # cpp :19-23

        @staticmethod
        def backward(ctx, g):
            return (*backward(torch, g, *ctx.saved_tensors), None)  # :20-32; no gradient for di

    return LoraSparseLinear


def forward(torch, x, w, scale):
    """SpLoRaLinear.forward (SLTrain@2335d62:splora/splora_linear.py:116-118): the scale alpha / r
    (:85) multiplies lora_A before the product. x [..., in] -> [..., out]."""
    return function(torch).apply(x, w["lora_B"], w["lora_A"] * scale, w["dv"], w["di"])
