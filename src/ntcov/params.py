"""The trainable weights of a module as a dict, and the safeguards on the module's mode.

Everything in ntcov is a function of a parameter dict ``dict[str, Tensor]`` keyed by the
names of ``module.named_parameters()`` (tied weights appear once, under their first name).
Parameters outside the dict and all buffers are held fixed at their current values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

ParamDict = dict[str, Tensor]
ParamSelection = str | nn.Module | Sequence[str | nn.Module] | None

__all__ = [
    "ParamDict",
    "ParamSelection",
    "check_mode",
    "num_params",
    "select_params",
]

_RENORMALISING = (nn.Embedding, nn.EmbeddingBag)
_STOCHASTIC_OR_BATCH_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def select_params(module: nn.Module, params: ParamSelection = None) -> ParamDict:
    """Copies of the parameters of ``module`` to differentiate, keyed by their names in ``module``.

    The copies share no storage with the module's weights, so an op that writes its weight in
    place (``nn.Embedding(max_norm=...)`` renormalises rows) cannot reach the user's model.

    ``params`` is ``None`` (every parameter with ``requires_grad``), or one or a sequence of:
    a parameter name (``"fc1.weight"``), a submodule name (``"fc1"``: all of its parameters),
    or a submodule object. Explicitly named parameters are included even when frozen.
    """
    if params is None:
        chosen = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not chosen:
            raise ValueError(
                f"select_params: {type(module).__name__} has no trainable parameters "
                "(none with requires_grad=True); pass params=... to choose some explicitly."
            )
        _check_weights(module, chosen)
        return {n: _copy(p) for n, p in chosen.items()}
    items = [params] if isinstance(params, str | nn.Module) else list(params)
    if not items:
        raise ValueError(
            "select_params: params is an empty sequence; pass None for all parameters."
        )
    names: dict[str, None] = {}
    for item in items:
        names.update(dict.fromkeys(_names_of(module, item)))
    all_params = dict(module.named_parameters())
    _check_weights(module, {n: all_params[n] for n in names})
    return {n: _copy(all_params[n]) for n in names}


def _check_weights(module: nn.Module, chosen: Mapping[str, Tensor]) -> None:
    """Refuse weights ntcov cannot differentiate: integer or complex dtypes, the meta device
    (no values), or several devices at once (the Jacobian blocks are contracted together)."""
    where = type(module).__name__
    devices = {str(w.device) for w in chosen.values()}
    if len(devices) > 1:
        by_device = {d: [n for n, w in chosen.items() if str(w.device) == d] for d in devices}
        listed = "; ".join(f"{d}: {_short_list(n, 3)}" for d, n in sorted(by_device.items()))
        raise ValueError(
            f"select_params: the selected parameters of {where} are on several devices "
            f"({listed}); move the model to one device (model.to(device)), or select the "
            "parameters of one device with params=."
        )
    _check_embeddings(module, set(chosen))
    for name, weight in chosen.items():
        if weight.is_complex():
            raise TypeError(
                f"select_params: parameter {name!r} of {where} is complex ({weight.dtype}); ntcov "
                "is defined for real weights. Store it as two real parameters (real and "
                "imaginary parts, torch.view_as_complex in forward), or leave it out with "
                "requires_grad_(False) or params=."
            )
        if not weight.is_floating_point():
            raise TypeError(
                f"select_params: parameter {name!r} of {where} has dtype {weight.dtype}; only "
                "floating-point weights can be differentiated. Leave it out of params= (a "
                "counter or index belongs in a buffer)."
            )
        if weight.device.type == "meta":
            raise ValueError(
                f"select_params: parameter {name!r} of {where} is on the meta device (it has no "
                "values); materialise the model first (module.to_empty(device=...) and "
                "load_state_dict)."
            )


def _check_embeddings(module: nn.Module, chosen: set[str]) -> None:
    """Refuse embeddings whose backward pass is not the derivative of their forward pass.

    ``scale_grad_by_freq=True`` divides each row's gradient by its count in the batch (so
    reverse-mode strategies disagree with forward mode and with the true derivative), and
    ``sparse=True`` returns sparse gradients that most strategies cannot contract."""
    for path, sub in module.named_modules():
        if not isinstance(sub, nn.Embedding | nn.EmbeddingBag):
            continue
        weight = f"{path}.weight" if path else "weight"
        if weight not in chosen:
            continue
        flag = "scale_grad_by_freq" if sub.scale_grad_by_freq else "sparse" if sub.sparse else ""
        if flag:
            raise ValueError(
                f"select_params: {type(sub).__name__} {path or '(the model)'!r} has {flag}=True: "
                f"its backward pass is not the plain derivative of its forward pass, so ntcov "
                f"would depend on the strategy. Set {flag}=False for the analysis (the weights "
                f"and the forward pass are unchanged), or leave {weight!r} out with params=."
            )


def _copy(param: Tensor) -> Tensor:
    """A detached copy of a weight, with its own storage."""
    return param.detach().clone()


def _names_of(module: nn.Module, item: str | nn.Module) -> list[str]:
    """Root parameter names selected by one entry of ``params``."""
    name_by_id = {id(p): n for n, p in module.named_parameters()}
    if isinstance(item, nn.Module):
        found = [name_by_id[id(p)] for p in item.parameters() if id(p) in name_by_id]
        if not found:
            raise ValueError(
                f"select_params: the {type(item).__name__} passed in params is not a submodule "
                f"of the property's {type(module).__name__}, or has no parameters."
            )
        return found
    if not isinstance(item, str):
        raise TypeError(
            f"select_params: params entries must be str or nn.Module, got {type(item).__name__}."
        )
    # every name a parameter is reachable by (tied weights have several) -> its first name
    aliases = {n: name_by_id[id(p)] for n, p in module.named_parameters(remove_duplicate=False)}
    if item in aliases:
        return [aliases[item]]
    under = list(dict.fromkeys(aliases[n] for n in aliases if n.startswith(item + ".")))
    if under:
        return under
    raise ValueError(
        f"select_params: {item!r} is neither a parameter nor a submodule with parameters of "
        f"{type(module).__name__}. Parameters are: {_short_list(name_by_id.values())}."
    )


def _short_list(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def num_params(params: ParamDict) -> int:
    """Total number of scalar weights P in a parameter dict."""
    return sum(p.numel() for p in params.values())


def check_mode(module: nn.Module, *, allow_train_mode: bool) -> None:
    """Refuse modules whose output is random or batch-dependent in training mode.

    BatchNorm in training mode mixes the examples of a batch and updates running statistics
    (so does BatchNorm without running statistics, in either mode); dropout (including the
    ``dropout`` argument of attention and recurrent layers) makes the property random. Either
    makes ntcov ill-defined, so they are refused unless the user opts in.
    """
    if allow_train_mode:
        return
    for path, sub in module.named_modules():
        where = path or "<root>"
        if uses_batch_statistics(sub) and not sub.training:
            raise ValueError(
                f"module {where!r} ({type(sub).__name__}) has no running statistics "
                "(track_running_stats=False), so it normalises with the statistics of the whole "
                "batch even in eval mode and ntcov would not be a function of the weights alone. "
                "Construct the Property with allow_train_mode=True to accept this."
            )
        if sub.training and _is_mode_sensitive(sub):
            raise ValueError(
                f"module {where!r} ({type(sub).__name__}) is in training mode: its output is "
                "random or depends on the whole batch, so ntcov would not be a function of the "
                "weights alone. Call model.eval() before computing ntcov, or construct the "
                "Property with allow_train_mode=True to accept this."
            )


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalises with batch statistics (BatchNorm in training mode or without
    running statistics), so that one example's output depends on the other examples."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return module.training or (module.running_mean is None and module.running_var is None)


def mixes_examples(module: nn.Module) -> bool:
    """Whether any submodule makes one example's output depend on the others in the batch."""
    return any(uses_batch_statistics(sub) for sub in module.modules())


def _is_mode_sensitive(module: nn.Module) -> bool:
    if isinstance(module, _STOCHASTIC_OR_BATCH_DEPENDENT):
        return not (isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0)
    dropout = getattr(module, "dropout", None)
    return isinstance(dropout, float) and dropout > 0


def copies_of_weights_written_in_place(module: nn.Module) -> dict[str, Tensor]:
    """Copies of the weights that the module's own forward pass overwrites.

    ``nn.Embedding`` and ``nn.EmbeddingBag`` with ``max_norm`` renormalise the rows they look up
    in place. Passing copies to ``functional_call`` for the weights that are not selected (and
    in ``Property.value()``) keeps those writes away from the user's module.
    """
    copies = {}
    for path, sub in module.named_modules():
        if isinstance(sub, _RENORMALISING) and sub.max_norm is not None:
            copies[f"{path}.weight" if path else "weight"] = _copy(sub.weight)
    return copies


def clone_buffers(module: nn.Module) -> dict[str, Tensor]:
    """Copies of all of the module's buffers (cheap: buffers are small next to the weights).

    Passing these to ``functional_call`` keeps every in-place update of a buffer away from the
    user's module: BatchNorm running statistics in training mode, or a forward pass that counts
    its calls (``self.calls += 1``).
    """
    return {n: b.clone() for n, b in module.named_buffers()}


def as_requires_grad(params: ParamDict) -> ParamDict:
    """Fresh leaf tensors sharing storage with ``params``, ready for ``torch.autograd.grad``."""
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}


def params_like(params: ParamDict, fill: float = 0.0) -> ParamDict:
    """A dict of tensors shaped like ``params`` filled with ``fill``."""
    return {n: torch.full_like(p, fill) for n, p in params.items()}
