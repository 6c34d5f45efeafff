"""PyTorch side of bench/gpu.md: eager fp32, eager TF32 and torch.compile latency of the
shared bench models' architectures on the GPU, batch 1 and 32, sequence 128 (vit: 224²).

The models are rebuilt with Hugging Face `transformers` from the configs the shared models'
README states (random weights; latency does not depend on them). Run on the GPU machine:
    pip install torch transformers
    python torch_gpu.py models/bench > torch_gpu.md
Not run in this repository's CI (no GPU)."""
import statistics
import sys
import time

import torch


VOCAB = 2000


def build(name):
    import transformers as tf
    if name == "bert_base_1l":
        c = tf.BertConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=1,
                          num_attention_heads=12, intermediate_size=3072)
        return tf.BertModel(c), "text"
    if name == "opt_1l":
        c = tf.OPTConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=1,
                         num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768)
        return tf.OPTModel(c), "text"
    if name == "llama_2l_512":
        c = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4,
                           intermediate_size=1408)
        return tf.LlamaModel(c), "text"
    if name == "vit_s16_6l":
        c = tf.ViTConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                         intermediate_size=1536, image_size=224, patch_size=16)
        return tf.ViTModel(c), "image"
    raise SystemExit(f"unknown model {name}")


def inputs(kind, batch, vocab):
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 224, 224, device="cuda")}
    ids = torch.randint(0, vocab, (batch, 128), device="cuda")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timed(fn, runs=50, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main(_root):
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| model | batch | fp32 eager ms | TF32 eager ms | torch.compile ms |")
    print("|---|---:|---:|---:|---:|")
    for name in ["bert_base_1l", "opt_1l", "llama_2l_512", "vit_s16_6l"]:
        model, kind = build(name)
        model = model.cuda().eval()
        vocab = VOCAB
        for batch in [1, 32]:
            x = inputs(kind, batch, vocab)
            with torch.inference_mode():
                torch.backends.cuda.matmul.allow_tf32 = False
                fp32 = timed(lambda: model(**x))
                torch.backends.cuda.matmul.allow_tf32 = True
                tf32 = timed(lambda: model(**x))
                compiled = torch.compile(model)
                comp = timed(lambda: compiled(**x))
            print(f"| {name} | {batch} | {fp32:.2f} | {tf32:.2f} | {comp:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/bench")
