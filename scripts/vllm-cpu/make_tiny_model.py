"""Builds a tiny Llama model (random weights, fixed seed) and a byte-level BPE tokenizer.

The model answers nonsense, but it exercises every part of a real vLLM engine: the scheduler,
the KV cache, prefill/decode disaggregation over NIXL, the OpenAI server. It is made locally
from nothing, in seconds, so no model hub is needed.

usage: make_tiny_model.py OUT_DIR
"""
import pathlib
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Enough text for the BPE trainer to learn a few hundred merges of common English.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! This is a tiny language model used to test serving software.",
    "Prefill computes the prompt's key and value cache; decode generates one token at a time.",
    "The decode engine pulls the prompt's KV cache from the prefill engine over NIXL.",
    "A proxy sends each request to a prefill engine first, then to a decode engine.",
    "Once upon a time there was a small model that answered every question with nonsense.",
    "What is the capital of France? Paris is the capital of France.",
    "Count to ten: one, two, three, four, five, six, seven, eight, nine, ten.",
    "You are a helpful assistant. Answer briefly and honestly.",
    "San Francisco is a city in California, on the west coast of the United States.",
] * 20


def build_tokenizer(out: pathlib.Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    print(f"tiny model in {out}: {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main()
