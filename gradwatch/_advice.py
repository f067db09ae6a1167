"""Mitigations chosen from what the adapter saw of the model, not one fixed string per kind."""

from __future__ import annotations

from ._context import RunContext

_SATURATING = {"sigmoid", "tanh", "softsign", "hardsigmoid", "hardtanh"}
_RELU_LIKE = {"relu", "relu6"}
_NON_DYING = {"leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "mish", "softplus"}


def _gains(ctx: RunContext, indices: list[int] | None = None) -> list[float]:
    """Init gains of layers where fan-in scaling means something: not embeddings (a lookup
    table has no fan-in), and not in normalised models (a norm layer rescales what a small init
    would shrink, which is why std 0.02 is the standard transformer init)."""
    if ctx.model.normalization:
        return []
    layers = ctx.layers if indices is None else [ctx.layers[i] for i in indices]
    return [layer.init_gain for layer in layers
            if layer.init_gain is not None and "embedding" not in layer.type.lower()]


def _small_init(ctx: RunContext, indices: list[int] | None = None) -> float | None:
    """Smallest init gain among the given layers when it is far below Xavier/He (< 0.5)."""
    gains = _gains(ctx, indices)
    if gains and min(gains) < 0.5:
        return min(gains)
    return None


def _large_init(ctx: RunContext) -> float | None:
    gains = _gains(ctx)
    if gains and max(gains) > 3.0:
        return max(gains)
    return None


def _saturating(ctx: RunContext) -> list[str]:
    """The saturating activations that make up most of the model's activation sites (a tanh in
    a pooler beside GELU blocks is not a tanh network); all of them when counts are unknown."""
    m = ctx.model
    kinds = sorted(m.activations & _SATURATING)
    counts = m.activation_counts
    if kinds and counts:
        total = sum(counts.values())
        if sum(counts.get(k, 0) for k in kinds) * 2 < total:
            return []
    return kinds


def _plain_rnn(ctx: RunContext) -> bool:
    return any(layer.type in ("RNN", "RNNCell", "SimpleRNN", "SimpleRNNCell")
               for layer in ctx.layers)


def vanishing(ctx: RunContext, indices: list[int]) -> tuple[str, ...]:
    m = ctx.model
    advice: list[str] = []
    saturating = _saturating(ctx)
    if saturating:
        advice.append(
            f"replace {'/'.join(saturating)} with ReLU or LeakyReLU and use He (Kaiming) init: "
            "their derivative is at most 0.25 (sigmoid) or 1 (tanh) and shrinks the gradient at "
            "every layer"
        )
    gain = _small_init(ctx, indices)
    if gain is not None:
        advice.append(
            f"initialise with Xavier/Glorot (tanh, sigmoid) or He (ReLU) scale: the weights of "
            f"these layers start at {gain:.2g}x of unit gain (He is ~1.4)"
        )
    if not m.normalization:
        advice.append("add BatchNorm (or LayerNorm) after each linear/conv layer")
    plain_stack = m.residual is not True and not m.normalization
    if m.residual is not True and m.depth >= 6:
        advice.append("add residual (skip) connections so gradient reaches early layers directly")
    if plain_stack and m.depth >= 6:
        advice.append(f"use fewer layers: {m.depth} parameterised layers is deep for this setup")
    if _plain_rnn(ctx):
        advice.append("use an LSTM/GRU instead of a plain RNN for long sequences")
    if not advice:
        advice.append("check that the loss depends on these layers' outputs (a detached branch "
                      "or a stop-gradient also starves them)")
    return tuple(advice)


def exploding(ctx: RunContext) -> tuple[str, ...]:
    m = ctx.model
    advice: list[str] = []
    if not m.clipping:
        advice.append("clip the gradient norm (torch.nn.utils.clip_grad_norm_(params, 1.0) / "
                      "Keras optimizer clipnorm=1.0)")
    lr = max(m.learning_rates) if m.learning_rates else None
    if lr is not None:
        advice.append(f"lower the learning rate (now {lr:g}; try {lr / 10:g})")
    else:
        advice.append("lower the learning rate by 10x")
    gain = _large_init(ctx)
    if gain is not None:
        advice.append(f"use Xavier/He init: weights start at {gain:.2g}x unit gain (He is ~1.4)")
    if m.recurrent:
        advice.append("keep the recurrent weight's spectral radius <= 1 (orthogonal init) or use "
                      "an LSTM/GRU")
    if not m.normalization:
        advice.append("add BatchNorm/LayerNorm to keep activations in range")
    return tuple(advice)


def nonfinite(ctx: RunContext, in_loss_only: bool) -> tuple[str, ...]:
    advice = list(exploding(ctx))
    if in_loss_only:
        advice.insert(0, "check the loss for log(0) or division by zero (use logits with "
                         "BCEWithLogits/CrossEntropy instead of log of a probability)")
    advice.append("check the input data for NaN/Inf")
    return tuple(dict.fromkeys(advice))


def plateau(ctx: RunContext, stuck: bool) -> tuple[str, ...]:
    m = ctx.model
    lr = max(m.learning_rates) if m.learning_rates else None
    if stuck:
        advice = list(vanishing(ctx, list(range(len(ctx.layers)))))
        if lr is not None:
            advice.append(f"check the learning rate ({lr:g}): too small stalls, too large "
                          "bounces around")
        return tuple(advice)
    advice = []
    if lr is not None:
        advice.append(f"reduce the learning rate on plateau (now {lr:g})")
    else:
        advice.append("reduce the learning rate on plateau")
    advice.append("stop early if the validation loss has stopped improving too")
    return tuple(advice)


def divergence(ctx: RunContext) -> tuple[str, ...]:
    m = ctx.model
    lr = max(m.learning_rates) if m.learning_rates else None
    advice = [f"lower the learning rate (now {lr:g}; try {lr / 10:g})" if lr is not None
              else "lower the learning rate by 10x"]
    advice.append("use a learning-rate warm-up")
    if not m.clipping:
        advice.append("clip the gradient norm")
    return tuple(advice)


def stalled(ctx: RunContext) -> tuple[str, ...]:
    m = ctx.model
    lr = max(m.learning_rates) if m.learning_rates else None
    if lr is not None:
        name = (m.optimizer or "").lower()
        typical = "1e-4..1e-3" if ("adam" in name or "rmsprop" in name) else "1e-2..1e-1"
        first = f"raise the learning rate (now {lr:g}; {typical} is typical for {m.optimizer})"
    else:
        first = "raise the learning rate"
    return (first, "check that the optimizer holds these parameters and that weight decay is not "
                   "cancelling the updates")


def large_update(ctx: RunContext) -> tuple[str, ...]:
    m = ctx.model
    lr = max(m.learning_rates) if m.learning_rates else None
    advice = [f"lower the learning rate (now {lr:g})" if lr is not None else "lower the learning rate"]
    if not m.clipping:
        advice.append("clip the gradient norm")
    advice.append("use a learning-rate warm-up")
    return tuple(advice)


def dead_units(ctx: RunContext) -> tuple[str, ...]:
    m = ctx.model
    advice = []
    if not (m.activations & _NON_DYING):
        advice.append("use LeakyReLU or PReLU, which keep a gradient for negative inputs")
    lr = max(m.learning_rates) if m.learning_rates else None
    advice.append(f"lower the learning rate (now {lr:g})" if lr is not None
                  else "lower the learning rate: large steps push units into the dead region")
    advice.append("use He init and a small positive bias")
    if not m.normalization:
        advice.append("add BatchNorm before the activation")
    return tuple(advice)


def saturated(ctx: RunContext) -> tuple[str, ...]:
    m = ctx.model
    advice = ["scale the inputs to mean 0, variance 1"]
    if not m.normalization:
        advice.append("add BatchNorm before the activation")
    advice.append("use Xavier/Glorot init for sigmoid/tanh")
    advice.append("use ReLU/LeakyReLU in hidden layers")
    return tuple(advice)
