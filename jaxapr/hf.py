"""Hugging Face interop: a policy as a ``transformers`` Llama model directory, and back.

:func:`export_hf(policy, out_dir)` writes

- ``config.json`` + ``model.safetensors``: a ``LlamaForCausalLM`` whose logits are the
  policy's (same RMSNorm, half-split rotary positions, SwiGLU MLP, grouped-query attention);
- ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``: a
  ``PreTrainedTokenizerFast`` giving the ids of :class:`jaxapr.tokenizer.CountdownTokenizer`
  (the trace phrases as added tokens matched leftmost-longest, every other character its own
  token or, outside the vocabulary, its UTF-8 bytes as ``<0xAB>`` tokens). With special tokens
  on (the default) it prepends ``<bos>``, as the policy's prompts start.

Only ``numpy`` and ``safetensors`` are needed to export; loading the directory into
``transformers`` needs ``torch`` and ``transformers`` (the ``hf`` extra).

:func:`load_hf(path)` reads such a directory back into a policy (``jaxapr.load_policy`` does
so for any directory holding ``config.json`` and ``model.safetensors``); a float32 export
round-trips every parameter exactly. Other Llama checkpoints load too where the architecture
matches (no biases, SiLU, unscaled rotary positions).

Parameter mapping (HF linear weights are ``[out, in]``; jaxapr's are ``[in, ...out]``):
``embed`` -> ``model.embed_tokens.weight``; per layer ``attn.wq/wk/wv`` [d, heads, head_dim]
-> ``self_attn.{q,k,v}_proj.weight`` [heads * head_dim, d], ``attn.wo`` -> ``o_proj``,
``mlp.w_gate/w_up/w_down`` -> ``mlp.{gate,up,down}_proj`` (transposed), ``attn_norm`` /
``mlp_norm`` -> ``input_layernorm`` / ``post_attention_layernorm``; ``final_norm`` ->
``model.norm``. jaxapr's tied output layer multiplies the embedding by ``d_model ** -0.5``,
which HF's weight tying cannot express, so the export writes ``lm_head.weight`` = that scaled
embedding with ``tie_word_embeddings: false``, and ``config.json``'s ``jaxapr`` entry records
the tie so that loading restores it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxapr.tokenizer import CHARS, DIGITS, NUM_BYTES, PHRASES, SPECIAL_TOKENS, CountdownTokenizer

HF_FORMAT = "jaxapr.hf/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
_DTYPES = ("float32", "bfloat16", "float16")


def is_hf_dir(path: str) -> bool:
    """Whether ``path`` is a directory holding ``config.json`` and ``model.safetensors``."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------
# How one jaxapr array becomes its HF tensor: "heads_in" [d, n, k] -> [n * k, d];
# "heads_out" [n, k, d] -> [d, n * k]; "t" a plain transpose; "same" unchanged.
def _to_hf(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "heads_in":
        a = a.reshape(a.shape[0], -1).T
    elif kind == "heads_out":
        a = a.reshape(-1, a.shape[-1]).T
    elif kind == "t":
        a = a.T
    return np.ascontiguousarray(a)


def _hf_shape(kind: str, shape: tuple) -> tuple:
    """The shape :func:`_to_hf` gives an array of ``shape``."""
    if kind == "heads_in":
        return (int(np.prod(shape[1:])), shape[0])
    if kind == "heads_out":
        return (shape[-1], int(np.prod(shape[:-1])))
    return tuple(reversed(shape)) if kind == "t" else tuple(shape)


def _from_hf(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
    return w.T.reshape(shape) if kind in ("heads_in", "heads_out", "t") else w.reshape(shape)


def _layer_names(i: int) -> list[tuple[str, str, str]]:
    """(jaxapr parameter path, HF tensor name, kind) of layer ``i``."""
    hf, jx = f"model.layers.{i}.", f"blocks/{i}/"
    return [
        (jx + "attn/wq", hf + "self_attn.q_proj.weight", "heads_in"),
        (jx + "attn/wk", hf + "self_attn.k_proj.weight", "heads_in"),
        (jx + "attn/wv", hf + "self_attn.v_proj.weight", "heads_in"),
        (jx + "attn/wo", hf + "self_attn.o_proj.weight", "heads_out"),
        (jx + "mlp/w_gate", hf + "mlp.gate_proj.weight", "t"),
        (jx + "mlp/w_up", hf + "mlp.up_proj.weight", "t"),
        (jx + "mlp/w_down", hf + "mlp.down_proj.weight", "t"),
        (jx + "attn_norm/scale", hf + "input_layernorm.weight", "same"),
        (jx + "mlp_norm/scale", hf + "post_attention_layernorm.weight", "same"),
    ]


def _name_table(num_layers: int, tied: bool) -> list[tuple[str, str, str]]:
    names = [("embed", "model.embed_tokens.weight", "same")]
    for i in range(num_layers):
        names += _layer_names(i)
    names.append(("final_norm/scale", "model.norm.weight", "same"))
    if not tied:
        names.append(("unembed", "lm_head.weight", "t"))
    return names


def _tied_head(embed: np.ndarray, d_model: int) -> np.ndarray:
    """The output layer of a tied policy as HF's ``lm_head.weight`` [vocab, d_model]: the
    embedding times ``d_model ** -0.5``, rounded as the policy's forward rounds it."""
    return embed * np.float32(d_model**-0.5)


def _is_tied_head(head: np.ndarray, embed: np.ndarray, d_model: int) -> bool:
    """Whether an exported ``lm_head.weight`` is the tied output layer of ``embed`` (as read
    back from the file): exactly for float32 files, within the rounding of 16-bit ones."""
    if head.shape != embed.shape:
        return False
    expected = _tied_head(embed, d_model)
    if head.dtype == np.float32:
        return bool(np.array_equal(head, expected))
    return bool(np.allclose(np.asarray(head, np.float32), expected, rtol=2.0**-6, atol=0.0))


def _policy_arrays(policy) -> dict[str, np.ndarray]:
    """jaxapr parameter path (``blocks/0/attn/wq``) -> float32 numpy array."""
    from flax import nnx

    from jaxapr.policy_io import _named_variables

    return {
        name.removesuffix("/.value"): np.asarray(var[...], np.float32)
        for name, var in _named_variables(nnx.split(policy)[1])
    }


def hf_tensors(policy, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The policy's parameters as HF Llama tensors (name -> array in ``dtype``)."""
    import ml_dtypes

    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(_DTYPES)}")
    cfg, arrays = policy.cfg, _policy_arrays(policy)
    out = {hf: _to_hf(kind, arrays[jx]) for jx, hf, kind in _name_table(cfg.num_layers, cfg.tie_embeddings)}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = _tied_head(arrays["embed"], cfg.d_model)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in out.items()}


# --------------------------------------------------------------------------------------
# config.json and the tokenizer files
# --------------------------------------------------------------------------------------
def hf_config(cfg, dtype: str = "float32") -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` equal to a policy of ``cfg`` (a ModelConfig)."""
    tok = CountdownTokenizer()
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dims_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        # rope_theta for transformers 4.x, rope_parameters for 5.x
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
        # what the HF fields cannot say: read back by load_hf
        "jaxapr": {
            "format": HF_FORMAT,
            "tie_embeddings": cfg.tie_embeddings,
            "dtype": cfg.dtype,
            "param_dtype": cfg.param_dtype,
        },
    }


def tokenizer_files(max_len: int) -> dict[str, dict]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` of a
    ``PreTrainedTokenizerFast`` with CountdownTokenizer's ids (see the module docstring)."""
    tok = CountdownTokenizer()
    vocab = {t: i for i, t in enumerate(tok.vocab)}
    assert len(vocab) == tok.vocab_size and all(vocab[t] == tok.token_id(t) for t in DIGITS + CHARS + PHRASES)
    assert tok.byte_offset == vocab["<0x00>"] and len(tok.vocab) >= tok.byte_offset + NUM_BYTES

    def added(text: str, special: bool) -> dict:
        return {
            "id": vocab[text],
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }

    bos = SPECIAL_TOKENS[tok.bos_id]
    bos_piece = {"SpecialToken": {"id": bos, "type_id": 0}}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        # The phrases are matched first, leftmost-longest, as CountdownTokenizer's regex does.
        "added_tokens": [added(t, True) for t in SPECIAL_TOKENS] + [added(t, False) for t in PHRASES],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos_piece,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        # No merges: every remaining character is its own token, or its UTF-8 bytes.
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
    specials = {"bos_token": bos, "eos_token": SPECIAL_TOKENS[tok.eos_id], "pad_token": SPECIAL_TOKENS[tok.pad_id]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_len,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        # "<bos>" inside a text is characters, as CountdownTokenizer encodes it
        "split_special_tokens": True,
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config, "special_tokens_map.json": specials}


# --------------------------------------------------------------------------------------
# Export and load
# --------------------------------------------------------------------------------------
def export_hf(policy, out_dir: str, dtype: str = "float32") -> str:
    """Writes ``policy`` as a Hugging Face Llama model + tokenizer directory (see the module
    docstring); returns ``out_dir``."""
    from safetensors.numpy import save_file

    tensors = hf_tensors(policy, dtype)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out={out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    save_file(tensors, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors creates it owner-only; the other files follow the umask
    files = {CONFIG_FILE: hf_config(policy.cfg, dtype), **tokenizer_files(policy.cfg.max_len)}
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return out_dir


def _read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path!r}: unreadable {CONFIG_FILE} ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{path!r}: {CONFIG_FILE} is not a JSON object")
    return config


def model_config(config: dict, path: str = "."):
    """The ModelConfig of an HF Llama ``config.json`` (a dict); one-line errors for what a
    jaxapr policy cannot be."""
    from jaxapr.model import ModelConfig

    arch = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"{path!r} holds model_type {config.get('model_type')!r}: expected a Llama model")
    unsupported = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (config.get("attention_bias", False), False),
        "mlp_bias": (config.get("mlp_bias", False), False),
    }
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    unsupported["rope_type"] = (rope.get("rope_type", rope.get("type", "default")), "default")
    for name, (found, expected) in unsupported.items():
        if found != expected:
            raise ValueError(f"{path!r}: {name}={found!r} is not supported (jaxapr's policy has {expected!r})")
    try:
        d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or d // heads
        ours = config.get("jaxapr") or {}
        return ModelConfig(
            vocab_size=int(config["vocab_size"]),
            d_model=d,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=None if d % heads == 0 and head_dim == d // heads else int(head_dim),
            mlp_dim=int(config["intermediate_size"]),
            max_len=int(config["max_position_embeddings"]),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(ours.get("tie_embeddings", False)),
            dtype=ours.get("dtype", "float32"),
            param_dtype=ours.get("param_dtype", "float32"),
        ).check()
    except KeyError as e:
        raise ValueError(f"{path!r}: {CONFIG_FILE} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path!r}: unusable {CONFIG_FILE} ({' '.join(str(e).split())[:200]})") from None


def load_hf(path: str):
    """The policy of an HF Llama directory (``config.json`` + ``model.safetensors``), such as
    :func:`export_hf` writes."""
    import dataclasses

    import jax
    from flax import nnx
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from jaxapr.policy_io import _abstract_policy, _named_variables

    if not is_hf_dir(path):
        raise FileNotFoundError(f"no Hugging Face model at {path!r}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = _read_config(path)
    cfg = model_config(config, path)
    try:
        tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path!r}: unreadable {WEIGHTS_FILE} ({' '.join(str(e).split())[:160]})") from None
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{path!r}: {WEIGHTS_FILE} lacks 'model.embed_tokens.weight': expected a Llama model")
    embed = np.asarray(tensors["model.embed_tokens.weight"], np.float32)
    head = tensors.get("lm_head.weight")
    if head is None:  # HF ties the output layer to the embedding (unscaled): untied here
        if not config.get("tie_word_embeddings", False):
            raise ValueError(f"{path!r}: {WEIGHTS_FILE} lacks 'lm_head.weight' and the config does not tie it")
        head = embed
    if cfg.tie_embeddings and not _is_tied_head(head, embed, cfg.d_model):
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # the output layer was changed after export
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = head
    graphdef, abstract = _abstract_policy(cfg)
    table = {jx: (hf, kind) for jx, hf, kind in _name_table(cfg.num_layers, cfg.tie_embeddings)}
    for name, var in _named_variables(abstract):
        hf, kind = table[name.removesuffix("/.value")]
        if hf not in tensors:
            raise ValueError(f"{path!r}: {WEIGHTS_FILE} lacks {hf!r}: expected a policy of its {CONFIG_FILE}")
        w = np.asarray(tensors[hf], np.float32)
        expected = _hf_shape(kind, var.shape)
        if w.shape != expected:
            raise ValueError(f"{path!r}: {hf!r} has shape {w.shape}, expected {expected}")
        var.set_value(jax.numpy.asarray(_from_hf(kind, w, var.shape), var.dtype))
    return nnx.merge(graphdef, abstract)
