"""Where an SAE reads a model: named sites of the reference transformer and of HF causal LMs.

Site names: ``block.<i>`` (the residual stream after decoder layer i, the G-SAE site) and
``mlp.<i>`` (the feed-forward output before the residual add, the SCAR site). The decoder layers
are found at ``layers`` (aa_compile's reference transformer), ``model.layers`` (Llama, Mistral,
Qwen, Gemma), ``transformer.h`` (GPT-2) or ``gpt_neox.layers`` (Pythia).
"""

from __future__ import annotations

from torch import nn

SITE_KINDS = ("block", "mlp")
_LAYER_PATHS = ("layers", "model.layers", "transformer.h", "gpt_neox.layers")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (see the module docstring for where it looks)."""
    for path in _LAYER_PATHS:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"{type(model).__name__}: no decoder layers found at any of {_LAYER_PATHS}")


def _mlp_name(layer: nn.Module) -> str | None:
    return next((n for n in _MLP_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)


def available_sites(model: nn.Module) -> list[str]:
    """Every site name the model offers."""
    sites = []
    for i, layer in enumerate(decoder_layers(model)):
        sites.append(f"block.{i}")
        if _mlp_name(layer) is not None:
            sites.append(f"mlp.{i}")
    return sites


def parse_site(model: nn.Module, site: str) -> tuple[str, int]:
    """``(kind, layer index)`` of a valid site; a ValueError listing the valid ones otherwise."""
    valid = available_sites(model)
    if not isinstance(site, str) or site not in valid:
        raise ValueError(f"unknown site {site!r}; valid sites: {', '.join(valid)}")
    kind, index = site.split(".")
    return kind, int(index)


def site_parent(model: nn.Module, site: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the module whose output is the site."""
    kind, index = parse_site(model, site)
    layers = decoder_layers(model)
    if kind == "block":
        return layers, str(index)
    layer = layers[index]
    return layer, _mlp_name(layer)  # type: ignore[return-value]


def site_module(model: nn.Module, site: str) -> nn.Module:
    """The module whose output is the site."""
    parent, name = site_parent(model, site)
    return parent[int(name)] if isinstance(parent, nn.ModuleList) else getattr(parent, name)
