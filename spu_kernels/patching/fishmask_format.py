"""FishMask's adapter file: the selected entries only (checkpoint.py's file codec "fishmask.sparse.v1").

Per masked tensor ``name`` (in ``named_parameters``' names) the file holds

* the mask, as whichever is smaller: ``name::fishmask.index`` (int64 sorted flat indices, 8 bytes per
  selected entry) or ``name::fishmask.bitmap`` (uint8, ceil(numel / 8) bytes; bit j of byte i is flat
  entry 8·i + j, numpy's ``packbits(bitorder="little")``): the bitmap wins above 1/64 of a tensor
  selected;
* ``name::fishmask.values``: the trained values at those indices (the parameter's dtype, in index order);
* ``name::fishmask.base_sha256``: SHA-256 (32 uint8) of the tensor's entries OUTSIDE the mask (the
  selected entries read as zero bytes), with its dtype and shape: those entries are the base model's.

The mask leaves the JSON options (``mask`` is absent from the file's and ``spu_config.json``'s options).
Loading scatters the values into a copy of the loading model's own tensor, so the result equals the saved
model bit for bit given the same base weights; a base whose entries outside the mask differ (other weights,
another dtype) is an error naming the tensor, raised before anything changes. Only the tensors holding
selected entries are checked: the untouched tensors of the base are the user's responsibility, as with
any adapter (PEFT's included). Tensors that train whole (task head, ``trainable_modules``) are stored whole.

Exactness needs the entries outside the mask to be the base's at save time. ``patch`` records their
digest; a tensor whose outside entries have moved since (a plain AdamW with weight decay decays them;
MaskedAdamW does not) is stored whole instead, with a warning, so the file still loads bit-identical.

Cost: one SHA-256 pass over every masked tensor (copied to the host in chunks of 16 Mi entries) at patch,
save and load; loading also holds a host copy of each masked tensor while it scatters.
"""
from __future__ import annotations

import hashlib
import warnings

import torch
import torch.nn as nn

from .checkpoint import FileCodec, register_file_codec
from .core import is_patched, patch_state
from .unwrap import full_tensor

ENCODING = "fishmask.sparse.v1"
SEP = "::fishmask."
_CHUNK = 1 << 24
#: the model's attribute holding {name: digest of the masked tensor's entries outside the mask, as patch
#: found them} (an attribute, so that copy.deepcopy of a patched model carries it)
_DIGESTS_ATTR = "_spu_fishmask_base_digests"


def base_digest(t: torch.Tensor, idx: torch.Tensor) -> bytes:
    """SHA-256 of ``t``'s dtype, shape and bytes with the entries at flat indices ``idx`` read as zero."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = full_tensor(t).detach().reshape(-1)
    idx = idx.to(flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK].to("cpu", copy=True)
        inside = idx[(idx >= start) & (idx < start + _CHUNK)] - start
        chunk[inside.cpu()] = 0
        h.update(chunk.view(torch.uint8).numpy())
    return h.digest()


def record_base(model: nn.Module, masked: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Remember the digests of ``masked`` (name -> (parameter, indices)) for ``model``'s patch."""
    model.__dict__[_DIGESTS_ATTR] = {n: base_digest(p, idx) for n, (p, idx) in masked.items()}


def forget_base(model: nn.Module) -> None:
    model.__dict__.pop(_DIGESTS_ATTR, None)


def pack_bits(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """The bitmap (uint8, ceil(numel / 8)) of flat indices ``idx``."""
    bits = torch.zeros((numel + 7) // 8 * 8, dtype=torch.bool)
    bits[idx.cpu()] = True
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (bits.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted int64 flat indices of a ``pack_bits`` bitmap; ValueError if it does not fit ``numel``."""
    if bitmap.dtype != torch.uint8 or bitmap.dim() != 1 or bitmap.numel() != (numel + 7) // 8:
        raise ValueError(f"a bitmap of {(numel + 7) // 8} uint8 was expected, got {bitmap.dtype} "
                         f"{tuple(bitmap.shape)}")
    bits = (bitmap.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
    flat = bits.reshape(-1).bool()
    if flat[numel:].any():
        raise ValueError("the bitmap sets bits past the tensor's end")
    return flat[:numel].nonzero().squeeze(1)


def _encode(model: nn.Module, options: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    options = dict(options)
    mask = options.pop("mask")
    digests = model.__dict__.get(_DIGESTS_ATTR, {})
    out = {n: t for n, t in tensors.items() if n not in mask}
    for name, listed in mask.items():
        whole = tensors[name]
        idx = torch.as_tensor(listed, dtype=torch.int64)
        if 8 * idx.numel() <= (whole.numel() + 7) // 8:
            out[f"{name}{SEP}index"] = idx.contiguous()
        else:
            out[f"{name}{SEP}bitmap"] = pack_bits(idx, whole.numel())
        digest = base_digest(whole, idx)
        if digest == digests.get(name):
            out[f"{name}{SEP}values"] = whole.reshape(-1)[idx].contiguous()
            out[f"{name}{SEP}base_sha256"] = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
        else:
            warnings.warn(f"fishmask: entries of {name} outside the mask changed since patch (a plain optimiser "
                          "with weight decay? MaskedAdamW(spu_kernels.fishmask_masks(model)) leaves them); the "
                          "adapter file stores this tensor whole", stacklevel=4)
            out[name] = whole
    return options, out


def _decode(model: nn.Module, options: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    params = dict(model.named_parameters())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key, t in tensors.items():
        name, sep, part = key.partition(SEP)
        if sep:
            parts.setdefault(name, {})[part] = t
        else:
            out[key] = t
    mask = {}
    for name, got in parts.items():
        if name not in params:
            raise ValueError(f"the adapter does not fit this model: it selects entries of {name}, which the model "
                             f"does not have (another architecture?)")
        p = params[name]
        numel = p.numel()
        try:
            if "index" in got:
                idx = got["index"]
                if idx.dtype != torch.int64 or idx.dim() != 1:
                    raise ValueError(f"the index must be 1-D int64, got {idx.dtype} {tuple(idx.shape)}")
                if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all())):
                    raise ValueError(f"the index is not sorted unique flat indices in [0, {numel})")
            elif "bitmap" in got:
                idx = unpack_bits(got["bitmap"], numel)
            else:
                raise ValueError("it has no index or bitmap")
        except ValueError as e:
            raise ValueError(f"the adapter's mask of {name} (shape {tuple(p.shape)}) does not fit this model: {e}"
                             ) from None
        mask[name] = idx
        if "values" not in got:
            if name not in out:
                raise ValueError(f"the adapter's file has neither the values nor the whole tensor of {name}")
            continue
        values, digest = got["values"], got.get("base_sha256")
        if values.dim() != 1 or values.numel() != idx.numel() or digest is None:
            raise ValueError(f"the adapter's values of {name} do not fit its mask ({values.numel()} values for "
                             f"{idx.numel()} indices{'' if digest is not None else ', no base digest'})")
        if base_digest(p, idx) != bytes(digest.tolist()):
            raise ValueError(f"the base weights differ from those the FishMask adapter was trained from: {name}'s "
                             f"entries outside the mask (or its dtype {str(p.dtype).removeprefix('torch.')}) are not "
                             "the saved base's; load it into the same base model (same weights and dtype)")
        whole = full_tensor(p).detach().to("cpu", copy=True).reshape(-1)
        whole[idx] = values.to(whole.dtype)
        out[name] = whole.view(p.shape)
    if is_patched(model) and patch_state(model).method == "fishmask":
        have = patch_state(model).options["mask"]
        if set(have) != set(mask) or any(have[n] != mask[n].tolist() for n in mask):
            raise ValueError("the model is patched with another FishMask mask than the adapter's; unpatch it first")
    return {**options, "mask": mask}, out


register_file_codec("fishmask", FileCodec(ENCODING, _encode, _decode))
