"""Stage-2 text: LLM tokenisation with label masking (decoder-only) and the prefix split (T5)."""

from __future__ import annotations

import random
import zlib

import torch

PROMPT_MASKS = ("joined", "lavis")  # llm.prompt_mask: the prompt's tokens in the joined text | LAVIS's count


class DecoderOnlyCollate:
    """OPT: text = prompt + caption + "\\n"; right padding to the longest in the batch.

    labels are -100 on the prompt (BOS included) and on padding; the caption and the "\\n" end
    token are targets. The visual prompts go in front later, with labels -100 too.

    The prompt's tokens are those the joined text starts with: a byte-level BPE tokenises a prompt's
    trailing space alone ("a photo of " -> ... "Ġof", "Ġ") but merges it into the caption's first word in
    the joined text ("Ġof", "Ġa"), so the length of the prompt tokenised alone would also mask the
    caption's first token (LAVIS's blip2_opt does: its prompt length comes from the prompt alone). That
    token is then never a target, yet generation after "a photo of" must produce it.
    ``prompt_mask="lavis"`` masks LAVIS's way (the prompt's length tokenised alone, for every row).
    """

    def __init__(self, tokenizer, prompt: str, max_len: int, prompt_mask: str = "joined"):
        if prompt_mask not in PROMPT_MASKS:
            raise ValueError(f"llm.prompt_mask={prompt_mask!r} is not valid; choose one of: {', '.join(PROMPT_MASKS)}")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_len = max_len
        self.prompt_mask = prompt_mask
        self.prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])  # BOS + prompt tokens

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        texts = [self.prompt + c + "\n" for c in captions]
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        ids = enc["input_ids"]
        if self.prompt_mask == "lavis":
            prompt_len = torch.full((ids.shape[0],), len(self.prompt_ids))
        else:
            head = ids[:, : len(self.prompt_ids)]  # per row: how many leading tokens are the prompt's
            prompt_len = (head == self.prompt_ids[: head.shape[1]]).long().cumprod(dim=1).sum(dim=1)
        masked = torch.arange(ids.shape[1])[None, :] < prompt_len[:, None]
        labels = ids.masked_fill((enc["attention_mask"] == 0) | masked, -100)
        return {"llm_input_ids": enc["input_ids"], "llm_attention_mask": enc["attention_mask"],
                "llm_labels": labels}


def prefix_split(caption: str, rng: random.Random) -> tuple[str, str]:
    """Split at a random word index in [1, middle]: (prefix, suffix); one-word captions keep it all."""
    words = caption.split(" ")
    if len(words) < 2:
        return "", caption
    split = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:split]), " ".join(words[split:])


class PrefixLMCollate:
    """FlanT5 prefix language modelling: encoder text = prefix, decoder target = suffix (+ </s>).

    Training draws the split from a seeded generator; evaluation (``deterministic=True``) seeds it
    from the caption itself, so every validation pass splits each caption the same way.
    """

    def __init__(self, tokenizer, max_len: int, seed: int = 0, deterministic: bool = False):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.seed = seed
        self.deterministic = deterministic
        self._rng: random.Random | None = None

    def start_stream(self, rank: int, worker: int, epoch: int) -> None:
        """A new training stream (an epoch of one worker of one rank, ``BatchSamples``): its own draws,
        so that a resumed run splits as an uninterrupted one does."""
        self._rng = random.Random(f"{self.seed}-{worker}" if rank == 0 and epoch == 0  # the earlier name
                                  else f"{self.seed}-{rank}-{worker}-{epoch}")

    def _generator(self, caption: str) -> random.Random:
        if self.deterministic:
            return random.Random(zlib.crc32(caption.encode()) ^ self.seed)
        if self._rng is None:  # one stream per worker process
            info = torch.utils.data.get_worker_info()
            self._rng = random.Random(f"{self.seed}-{info.id if info else 0}")
        return self._rng

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        pairs = [prefix_split(c, self._generator(c)) for c in captions]
        enc = self.tokenizer([p for p, _ in pairs], padding="longest", truncation=True,
                             max_length=self.max_len, return_tensors="pt")
        dec = self.tokenizer([s for _, s in pairs], padding="longest", truncation=True,
                             max_length=self.max_len, return_tensors="pt")
        labels = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)
        return {"llm_input_ids": enc["input_ids"], "llm_attention_mask": enc["attention_mask"],
                "llm_labels": labels, "llm_decoder_attention_mask": dec["attention_mask"]}
