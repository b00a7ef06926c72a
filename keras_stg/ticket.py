"""Compact tickets: a strong lottery ticket as its seed and an entropy-coded mask.

An `slt` ticket's kernels are random weights drawn from a seed
(`keras_stg.initializers`, bit-exact on every platform) times a binary mask,
so the whole network is its architecture, the init recipe, the seed and the
mask. `save_ticket` writes exactly that; `load_ticket` regenerates the
weights, applies the mask and returns the stripped model, its weights equal
bit for bit to the ones saved and its outputs identical.

File layout (little-endian):

| bytes | what |
|---|---|
| 8 | magic `b"\\x89TICKET\\n"` |
| 2 | format version (`FORMAT_VERSION`) |
| 4 | header length `h` |
| 4 | body length `b` |
| 4 | CRC-32 of the version, both lengths, the header and the body |
| h | header: zlib-compressed UTF-8 JSON |
| b | body: the coded masks, then the zlib-compressed stored weights |

The header holds the random stream's and the coder's algorithm names (a
reader with other ones refuses the file), the Keras model config
(`keras.saving.serialize_keras_object`), the recipe (`init`, `seed`, `gain`,
`density`) and one entry per weight of the model, in `model.weights` order:

- a regenerated kernel: its random stream (the kernel's index among the gated
  kernels), its fan-in and its mask. The mask is stored as its smallest exact
  description: the repeat of every axis (a unit mask repeats along the input
  axes, a 1x4 block mask by 4 along one axis) and, where the rest is an outer
  product of one bit vector per axis (channel masks: kept inputs x kept
  outputs), just those vectors; the bits left are range-coded
  (`keras_stg._coding`) against their own rate of ones. All-zero or all-one
  masks take no bytes.
- any other weight (biases, normalization weights and statistics, kernels
  left ungated): `zeros`, a `fill` value, or its bytes in the compressed
  section.

Example:

```python
keras_stg.save_ticket(gated, "lenet.ticket")    # a GatedModel in slt mode
model = keras_stg.load_ticket("lenet.ticket")   # plain keras.Model, the stripped ticket
```
"""

import json
import math
import os
import re
import struct
import zlib

import keras
import numpy as np

from keras_stg import _coding
from keras_stg import _files
from keras_stg import _random
from keras_stg import initializers

#: Version of the file layout; a reader refuses a version it does not know.
FORMAT_VERSION = 1
#: First bytes of every ticket file.
MAGIC = b"\x89TICKET\n"
#: File name suffix of tickets.
SUFFIX = ".ticket"
#: The coder the masks are written with (`keras_stg._coding`).
CODER = (f"range-coder:bytes:static-bernoulli:total=2^{_coding.TOTAL_BITS}:"
         f"range=2^{_coding.RANGE_BITS}")

_PREAMBLE = struct.Struct("<8sHIII")
_EXPORT_HINT = ("ship it with `python -m export.tflite --model M --out model.tflite "
                "--sparse` instead")


class TicketError(ValueError):
    """A model that cannot be saved as a ticket, or a file that is not a readable ticket."""


# ------------------------------------------------------------------ saving


def save_ticket(model, path, *, init=None, seed=None, density=None, gain=None,
                include=None, exclude=None, metadata=None):
    """Writes an `slt` ticket as its seed, init recipe and entropy-coded mask.

    Args:
        model: a `keras_stg.GatedModel` in `slt` mode (the recipe is its
            `config`: `init`, `seed`, `init_density`, `include`/`exclude`), or
            a stripped plain `keras.Model` with the recipe as keywords.
        path: the output file, ending in `.ticket`; written atomically.
        init, seed, density, gain, include, exclude: only with a plain model:
            the initialisation that drew its kernels (default
            `"signed_constant"`, `wrap`'s in `slt` mode; `gain` None: the
            init's own), the seed (required), the scale-fan density, and the
            layers that were gated. Every kept weight is checked against the
            weights this recipe regenerates, bit for bit.
        metadata: optional JSON-serializable dict stored in the header (e.g.
            the dataset and accuracy); `ticket_info` returns it.

    Returns:
        A dict of sizes: `bytes` (the file), `header_bytes`, `mask_bytes`,
        `weight_bytes`, `entropy_bound_bytes` (sum over kernels of
        `n * H(keep rate)` / 8) and one entry per kernel under `kernels`.

    Raises:
        TicketError: not an `slt` model, weights not drawn from a bit-exact
            recipe (`kaiming_normal`, `init=None`), a plain model whose kept
            weights differ from the recipe's, no seed, or a bad `path`.

    Example:

    ```python
    gated = keras_stg.wrap(model, target_sparsity=0.9, seed=0)   # slt mode
    gated.compile(...); gated.fit(...)
    keras_stg.save_ticket(gated, "lenet.ticket")
    keras_stg.save_ticket(gated.strip(), "lenet.ticket", seed=0)  # or the stripped model
    ```
    """
    path = _check_path(path)
    data, _ = encode(model, init=init, seed=seed, density=density, gain=gain,
                     include=include, exclude=exclude, metadata=metadata)
    _files.atomic_write_bytes(path, data)
    return ticket_info(data)


def encode(model, *, init=None, seed=None, density=None, gain=None,
           include=None, exclude=None, metadata=None):
    """The bytes of the ticket `save_ticket` writes, and the stripped model they describe."""
    stripped, recipe, kernels, extra = _source(model, init, seed, density, gain, include,
                                               exclude)
    if metadata is not None:
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TicketError(f"`metadata` must be JSON-serializable: {e}") from None
    kind, _ = initializers.RECIPES[recipe["init"]]
    entries, masks, stored = [], [], []
    for index, variable in enumerate(stripped.weights):
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        entry = {"path": variable.path, "shape": list(value.shape), "dtype": value.dtype.name}
        if index in kernels:
            stream, fan_in = kernels[index]
            entry.update(store="kernel", stream=stream, fan_in=fan_in)
            regenerated = initializers.kernel_values(
                kind, recipe["seed"], stream, value.shape, fan_in, recipe["gain"],
                recipe["density"], value.dtype)
            mask = value != 0
            entry["zeros"] = _zero_sign(variable.path, value, regenerated, mask, recipe)
            entry["mask"], coded = _describe_mask(mask)
            masks.append((entry["mask"], coded))
        else:
            entry.update(_describe_weight(value, stored))
        entries.append(entry)
    body = bytearray()
    for description, coded in masks:
        description["offset"], description["length"] = len(body), len(coded)
        body += coded
    raw = b"".join(stored)
    packed = zlib.compress(raw, 9) if raw else b""
    sections = {"masks": [0, len(body)], "weights": [len(body), len(packed), len(raw)]}
    body += packed
    header = {
        "format": "keras-stg ticket",
        "generator": _random.ALGORITHM,
        "coder": CODER,
        "keras": keras.__version__,
        "model": keras.saving.serialize_keras_object(stripped),
        "recipe": recipe,
        "weights": entries,
        "sections": sections,
        **extra,
    }
    if metadata is not None:
        header["metadata"] = metadata
    data = _pack(header, bytes(body))
    # Check the coded masks before anything is written: a ticket that does not
    # decode to its model must never leave this function.
    _check_masks(data, stripped)
    return data, stripped


def _source(model, init, seed, density, gain, include, exclude):
    """`(stripped model, recipe, {weight index: (stream, fan_in)}, header extras)`."""
    from keras_stg.gated_model import GatedModel
    from keras_stg.masking import MaskedModel
    from keras_stg.targets import find_targets

    if isinstance(model, GatedModel):
        recipe_keywords = (("init", init), ("seed", seed), ("density", density),
                           ("gain", gain), ("include", include), ("exclude", exclude))
        given = [k for k, v in recipe_keywords if v is not None]
        if given:
            raise TicketError(
                f"save_ticket reads the recipe of a GatedModel from its config; drop "
                f"{', '.join(f'{k}=' for k in given)} (they are for a stripped plain model).")
        config = model.config
        if config.mode != "slt":
            raise TicketError(
                f"Only slt tickets (random weights drawn from a seed) can be saved as "
                f"tickets; {model.name!r} is mode={config.mode!r}, whose weights are not "
                f"regenerable from a seed: {_EXPORT_HINT}.")
        if config.init is None:
            raise TicketError(
                f"{model.name!r} was wrapped with init=None: it kept the weights it came "
                f"with, which no seed regenerates; {_EXPORT_HINT}.")
        # `wrap` draws the weights of a model without a seed with seed 0.
        seed = 0 if config.seed is None else config.seed
        recipe = _recipe(config.init, seed, config.init_density, None)
        weights = model.base_model.weights
        stripped = model.strip()
        extra = {"granularity": str(config.granularity)}
        targets = model.targets
    elif isinstance(model, MaskedModel):
        raise TicketError(
            f"save_ticket takes a keras_stg.GatedModel or a stripped plain keras.Model, "
            f"got a {type(model).__name__}; save its stripped model with the recipe as "
            "keywords.")
    elif isinstance(model, keras.Model):
        if seed is None:
            raise TicketError(
                "save_ticket(model, path, seed=...) needs the seed that drew the weights of "
                "a plain model (keras_stg.wrap(..., seed=N)): without it they cannot be "
                "regenerated. Pass the GatedModel itself to read it from its config.")
        recipe = _recipe("signed_constant" if init is None else init, seed, density, gain)
        weights = model.weights
        stripped = model
        extra = {}
        try:
            targets = find_targets(model, include, exclude)[0]
        except ValueError as e:
            raise TicketError(str(e)) from None
    else:
        raise TicketError(
            f"save_ticket takes a keras_stg.GatedModel or a keras.Model, got "
            f"{type(model).__name__}.")
    position = {id(v): i for i, v in enumerate(weights)}
    if len(stripped.weights) != len(weights):
        raise TicketError(
            f"The stripped model has {len(stripped.weights)} weights, the gated one "
            f"{len(weights)}; it cannot be described weight by weight.")
    kernels = {position[id(t.variable)]: (stream, int(t.fan_in))
               for stream, t in enumerate(targets)}
    if not kernels:
        raise TicketError(f"{model.name!r} has no gated kernel: there is no ticket to save.")
    return stripped, recipe, kernels, extra


def _recipe(init, seed, density, gain):
    if init not in initializers.RECIPES:
        raise TicketError(
            f"Unknown init {init!r}; tickets regenerate one of {list(initializers.EXACT)}.")
    if init not in initializers.EXACT:
        raise TicketError(
            f"init={init!r} cannot be saved as a ticket: its draws need log and cos, whose "
            "last bit differs between math libraries, so its weights are not regenerable "
            f"bit for bit everywhere. Use init='signed_constant' or 'kaiming_uniform' (same "
            f"variance) for tickets, or {_EXPORT_HINT}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
            0 <= int(seed) < 2**64):
        raise TicketError(f"`seed` must be an integer in [0, 2**64), got {seed!r}.")
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise TicketError(f"`density` must be in (0, 1] or None, got {density!r}.")
    gain = initializers.RECIPES[init][1] if gain is None else float(gain)
    return {"init": init, "seed": int(seed), "gain": gain,
            "density": None if density is None else float(density)}


def _zero_sign(path, value, regenerated, mask, recipe):
    """How the pruned entries' zeros are signed: `"signed"` (the weight's sign, as
    `kernel * mask` leaves them) or `"positive"`; raises if kept weights differ."""
    bits = value.view(f"u{value.itemsize}")
    signed = regenerated * mask.astype(value.dtype)
    if np.array_equal(bits, signed.view(bits.dtype)):
        return "signed"
    if np.array_equal(bits, np.where(mask, regenerated, 0).astype(value.dtype).view(bits.dtype)):
        return "positive"
    differ = np.flatnonzero(mask.ravel() & (value.ravel() != regenerated.ravel()))
    where = (f"{differ.size} of {int(mask.sum())} kept weights differ, the first at flat "
             f"index {differ[0]} ({value.ravel()[differ[0]]!r} against "
             f"{regenerated.ravel()[differ[0]]!r})" if differ.size else
             "its zeros carry mixed signs")
    recipe_text = ", ".join(f"{k}={v!r}" for k, v in recipe.items())
    raise TicketError(
        f"Kernel {path!r} is not the recipe's weights times a mask: {where}. The recipe "
        f"({recipe_text}) does not regenerate this model: pass the init, seed, density and "
        f"include/exclude it was wrapped with, or, for trained weights, {_EXPORT_HINT}.")


def _describe_mask(mask):
    """`(header entry, coded bytes)` of a kernel's binary mask (see the module docstring)."""
    description = {"kept": int(np.count_nonzero(mask))}
    if description["kept"] in (0, mask.size):
        return description, b""
    repeat = []
    for axis, length in enumerate(mask.shape):
        moved = np.moveaxis(mask, axis, 0).reshape(length, -1)
        changes = np.flatnonzero(np.any(moved[1:] != moved[:-1], axis=1)) + 1
        repeat.append(int(np.gcd.reduce(changes)) if changes.size else length)
    grid = mask[tuple(slice(None, None, r) for r in repeat)]
    bits = grid.ravel()
    factors = []
    if grid.ndim > 1:
        vectors = [np.any(grid, axis=tuple(a for a in range(grid.ndim) if a != axis))
                   for axis in range(grid.ndim)]
        factors = [axis for axis, v in enumerate(vectors) if not v.all()]
        if sum(grid.shape[a] for a in factors) < grid.size and np.array_equal(
                _outer(vectors, grid.shape), grid):
            bits = np.concatenate([vectors[a] for a in factors])
        else:
            factors = []
    if any(r != 1 for r in repeat):
        description["repeat"] = repeat
    if factors:
        description["factors"] = factors
    description["bits"] = int(bits.size)
    description["ones"] = int(np.count_nonzero(bits))
    return description, _coding.encode(bits)


def _outer(vectors, shape):
    """The AND of one boolean vector per axis, broadcast to `shape`."""
    result = np.ones(shape, bool)
    for axis, vector in enumerate(vectors):
        result &= vector.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return result


def _describe_weight(value, stored):
    """The header entry of a weight the recipe does not regenerate; appends its bytes
    to `stored` unless it is all zeros or one repeated value."""
    little = value.astype(value.dtype.newbyteorder("<"), copy=False)
    raw = little.tobytes()
    if not any(raw):
        return {"store": "zeros"}
    first = little.ravel()[:1].tobytes()
    if value.size > 1 and raw == first * value.size:
        return {"store": "fill", "value": first.hex()}
    stored.append(raw)
    return {"store": "raw", "offset": sum(len(s) for s in stored[:-1]), "length": len(raw)}


def _pack(header, body):
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    compressed = zlib.compress(text, 9)
    fields = struct.pack("<HII", FORMAT_VERSION, len(compressed), len(body))
    crc = zlib.crc32(body, zlib.crc32(compressed, zlib.crc32(fields)))
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(compressed), len(body), crc) + \
        compressed + body


def _check_masks(data, stripped):
    header, body = _unpack(data, "the new ticket")
    for entry, variable in zip(header["weights"], stripped.weights):
        if entry["store"] == "kernel":
            expected = np.asarray(keras.ops.convert_to_numpy(variable)) != 0
            if not np.array_equal(_mask(entry, body, header), expected):
                raise RuntimeError(f"The coded mask of {entry['path']!r} does not decode to "
                                   "itself; please report this.")


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TicketError(f"The ticket path must be a file path, got {path!r}.")
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise TicketError(
            f"Ticket files end in {SUFFIX!r}; got {path!r}. E.g. "
            f"{os.path.splitext(path)[0] or 'model'}{SUFFIX}.")
    return path


# ----------------------------------------------------------------- loading


def load_ticket(path, custom_objects=None, safe_mode=True):
    """Rebuilds the stripped model a ticket describes.

    The architecture is deserialized from the header, every gated kernel is
    regenerated from the seed and multiplied by its decoded mask, every other
    weight is read back; the result equals the model that was saved, weight
    for weight and bit for bit.

    Args:
        path: a `.ticket` file (`save_ticket`), or its bytes.
        custom_objects: classes the architecture needs that are not registered
            with Keras, as for `keras.models.load_model`.
        safe_mode: as for `keras.models.load_model` (refuses `Lambda` bytecode).

    Returns:
        A plain `keras.Model`.

    Raises:
        TicketError: not a ticket, truncated or corrupted (checksum), a format
            version or algorithm this keras-stg does not know, or a layer class
            that is not importable.

    Example:

    ```python
    model = keras_stg.load_ticket("lenet.ticket")
    model.predict(x)        # the stripped ticket's outputs, exactly
    ```
    """
    data, name = _read(path)
    header, body = _unpack(data, name)
    model = _rebuild(header["model"], custom_objects, safe_mode, name)
    entries = header["weights"]
    if len(model.weights) != len(entries):
        raise TicketError(
            f"{name}: the rebuilt architecture has {len(model.weights)} weights, the ticket "
            f"{len(entries)}; it was written with another version of the model's code.")
    recipe = header["recipe"]
    kind, _ = initializers.RECIPES[recipe["init"]]
    start, length, size = header["sections"]["weights"]
    raw = zlib.decompress(body[start:start + length]) if length else b""
    if len(raw) != size:
        raise TicketError(f"{name}: the stored weights section is corrupt.")
    for variable, entry in zip(model.weights, entries):
        shape = tuple(entry["shape"])
        if tuple(variable.shape) != shape:
            raise TicketError(
                f"{name}: weight {entry['path']!r} has shape {shape} in the ticket but "
                f"{tuple(variable.shape)} in the rebuilt model.")
        dtype = np.dtype(entry["dtype"])
        store = entry["store"]
        if store == "kernel":
            regenerated = initializers.kernel_values(
                kind, recipe["seed"], entry["stream"], shape, entry["fan_in"], recipe["gain"],
                recipe["density"], dtype)
            mask = _mask(entry, body, header, name)
            if entry["zeros"] == "signed":
                value = regenerated * mask.astype(dtype)
            else:
                value = np.where(mask, regenerated, 0).astype(dtype)
        elif store == "zeros":
            value = np.zeros(shape, dtype)
        elif store == "fill":
            value = np.full(shape, np.frombuffer(bytes.fromhex(entry["value"]),
                                                 dtype.newbyteorder("<"))[0], dtype)
        else:
            chunk = raw[entry["offset"]:entry["offset"] + entry["length"]]
            value = np.frombuffer(chunk, dtype.newbyteorder("<")).astype(dtype).reshape(shape)
        variable.assign(value)
    return model


def ticket_info(path):
    """The header of a ticket and its sizes, without rebuilding the model.

    Returns a dict: `bytes`, `header_bytes` (preamble and compressed header),
    `mask_bytes`, `weight_bytes`, `entropy_bound_bytes` (sum over kernels of
    `n * H(kept / n)` / 8), `coded_bound_bytes` (the same over the bits actually
    coded: the gates of a structured mask), `kernel_weights`, `kept`,
    `sparsity`, `recipe`, `model` (its name), `granularity` and `metadata` if
    recorded, and `kernels`: per kernel `path`, `weights`, `kept`, `bits`,
    `mask_bytes`, `bound_bytes`.
    """
    data, name = _read(path)
    header, body = _unpack(data, name)
    kernels = []
    for entry in header["weights"]:
        if entry["store"] != "kernel":
            continue
        mask = entry["mask"]
        n = math.prod(entry["shape"])
        kernels.append({
            "path": entry["path"], "weights": n, "kept": mask["kept"],
            "bits": mask.get("bits", 0), "mask_bytes": mask.get("length", 0),
            "bound_bytes": _coding.entropy_bits(mask["kept"], n) / 8,
            "coded_bound_bytes": _coding.entropy_bits(mask.get("ones", 0),
                                                      mask.get("bits", 0)) / 8,
        })
    total = sum(k["weights"] for k in kernels)
    kept = sum(k["kept"] for k in kernels)
    info = {
        "bytes": len(data),
        "header_bytes": len(data) - len(body),
        "mask_bytes": header["sections"]["masks"][1],
        "weight_bytes": header["sections"]["weights"][1],
        "entropy_bound_bytes": sum(k["bound_bytes"] for k in kernels),
        "coded_bound_bytes": sum(k["coded_bound_bytes"] for k in kernels),
        "kernel_weights": total,
        "kept": kept,
        "sparsity": 1.0 - kept / total if total else 0.0,
        "recipe": header["recipe"],
        "model": header["model"].get("config", {}).get("name"),
        "kernels": kernels,
    }
    for key in ("granularity", "metadata"):
        if key in header:
            info[key] = header[key]
    return info


def _read(path):
    if isinstance(path, (bytes, bytearray, memoryview)):
        return bytes(path), "the ticket"
    if not isinstance(path, (str, os.PathLike)):
        raise TicketError(f"Expected a ticket file path or bytes, got {type(path).__name__}.")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TicketError(f"Ticket {path!r} does not exist.")
    with open(path, "rb") as f:
        return f.read(), repr(path)


def _unpack(data, name):
    """`(header dict, body bytes)` of a ticket, every check of the layout done."""
    if len(data) < _PREAMBLE.size or not data.startswith(MAGIC):
        raise TicketError(
            f"{name} is not a keras-stg ticket (it does not start with the ticket magic "
            f"bytes); write tickets with keras_stg.save_ticket.")
    _, version, header_size, body_size, crc = _PREAMBLE.unpack_from(data)
    expected = _PREAMBLE.size + header_size + body_size
    if len(data) < expected:
        raise TicketError(
            f"{name} is truncated: {len(data)} of its {expected} bytes are there. Copy or "
            "download it again.")
    if len(data) > expected:
        raise TicketError(
            f"{name} has {len(data) - expected} bytes after its end ({expected} bytes); "
            "the file is corrupt. Copy or download it again.")
    fields = data[8:_PREAMBLE.size - 4]
    header_bytes = data[_PREAMBLE.size:_PREAMBLE.size + header_size]
    body = data[_PREAMBLE.size + header_size:]
    if zlib.crc32(body, zlib.crc32(header_bytes, zlib.crc32(fields))) != crc:
        raise TicketError(
            f"{name} is corrupt: its checksum does not match its contents. Copy or download "
            "it again.")
    if version != FORMAT_VERSION:
        raise TicketError(
            f"{name} has ticket format version {version}; this keras-stg reads version "
            f"{FORMAT_VERSION}. Install the keras-stg version that wrote it (or a newer one).")
    try:
        header = json.loads(zlib.decompress(header_bytes).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, ValueError) as e:
        raise TicketError(f"{name} has an unreadable header: {e}.") from None
    if header.get("recipe", {}).get("init") not in initializers.EXACT:
        raise TicketError(f"{name} names an init this keras-stg cannot regenerate: "
                          f"{header.get('recipe', {}).get('init')!r}.")
    for key, known in (("generator", _random.ALGORITHM), ("coder", CODER)):
        if header.get(key) != known:
            raise TicketError(
                f"{name} was written with the {key} {header.get(key)!r}; this keras-stg has "
                f"{known!r} and cannot regenerate it bit for bit. Install the keras-stg "
                "version that wrote it.")
    return header, body


def _mask(entry, body, header, name="the ticket"):
    """The boolean mask of a kernel entry, decoded and expanded to the kernel's shape."""
    shape = tuple(entry["shape"])
    description = entry["mask"]
    kept = description["kept"]
    if kept in (0, math.prod(shape)):
        return np.full(shape, bool(kept))
    start, _ = header["sections"]["masks"]
    at = start + description["offset"]
    try:
        bits = _coding.decode(body[at:at + description["length"]], description["bits"],
                              description["ones"])
    except _coding.CodingError as e:
        raise TicketError(f"{name}: the mask of {entry['path']!r} is corrupt: {e}.") from None
    repeat = description.get("repeat", [1] * len(shape))
    grid_shape = [-(-length // r) for length, r in zip(shape, repeat)]
    factors = description.get("factors")
    if factors:
        vectors, at = [], 0
        for axis, length in enumerate(grid_shape):
            if axis in factors:
                vectors.append(bits[at:at + length])
                at += length
            else:
                vectors.append(np.ones(length, bool))
        grid = _outer(vectors, grid_shape)
    else:
        grid = bits.reshape(grid_shape)
    for axis, (length, r) in enumerate(zip(shape, repeat)):
        if r != 1:
            grid = np.repeat(grid, r, axis=axis)[(slice(None),) * axis + (slice(0, length),)]
    if int(np.count_nonzero(grid)) != kept:
        raise TicketError(f"{name}: the mask of {entry['path']!r} is corrupt.")
    return grid


def _rebuild(config, custom_objects, safe_mode, name):
    try:
        model = keras.saving.deserialize_keras_object(
            json.loads(json.dumps(config)),  # a copy: Keras pops keys from what it reads
            custom_objects=custom_objects, safe_mode=safe_mode)
    except Exception as e:  # noqa: BLE001 - Keras raises TypeError, ValueError, ...
        missing = re.search(r"Could not locate (?:class|function) '([^']+)'", str(e))
        if missing:
            cls = missing.group(1)
            found = _find_class(config, cls) or {}
            key = found.get("registered_name") or cls
            module = f" (module {found['module']!r})" if found.get("module") else ""
            raise TicketError(
                f"{name} needs the layer class {cls!r}{module}, which is not importable here. "
                "Import the module that defines it (its class decorated with "
                "@keras.saving.register_keras_serializable()) before load_ticket, or pass "
                f"custom_objects={{{key!r}: {cls}}}.") from None
        raise TicketError(f"{name}: could not rebuild its architecture: {e}") from None
    if not isinstance(model, keras.Model):
        raise TicketError(f"{name} describes a {type(model).__name__}, not a keras.Model.")
    if not model.built:
        raise TicketError(f"{name}: its architecture rebuilt without weights (not built).")
    return model


def _find_class(config, cls):
    """The first serialized object in `config` whose class is `cls`, or None."""
    if isinstance(config, dict):
        if config.get("class_name") == cls:
            return config
        children = config.values()
    elif isinstance(config, list):
        children = config
    else:
        return None
    for child in children:
        found = _find_class(child, cls)
        if found is not None:
            return found
    return None
