# PyTorch anchor for the performance area: LoRA finetuning throughput of transformers+peft with
# AdamW and with IVON (ivon-opt), on a randomly initialised Llama-family model, bf16, on one GPU.
#
# A copy of ../shared/bench/torch_anchor.py (same model build, optimizers, loss, timing and fields),
# adapted only to take the model shape from a config.json (configs/bench/*.json, the files
# `bayeslora bench train --shape` reads), to take the list of runs on the command line, and to
# append each result as one JSON line to --out. Added fields: stack, shape, device_name, dtype,
# steps, warmup, n_frozen_params, peak_device_gib (max of total - free from cudaMemGetInfo after
# every step, the measure bayeslora's peak_gib uses on CUDA), versions; a failed run (OOM, no
# ivon-opt) writes a row with "error" instead of the timings.
#
#   python3 scripts/bench/torch_anchor.py --out pytorch.jsonl \
#       --run configs/bench/llama2_7b.json:4:512:q_proj,v_proj:adamw \
#       --run configs/bench/llama2_7b.json:8:1024:all-linear:ivon
#   python3 scripts/bench/torch_anchor.py --out pytorch.jsonl      # the original anchor's six runs
#   python3 scripts/bench/torch_anchor.py --variant eager --variant compile --variant liger ...
#
# --run is SHAPE:BSZ:SEQ:TARGETS:OPT with TARGETS a comma-separated module list or all-linear.
# --variant (repeatable; default eager) is the PyTorch path a user would take:
#   eager    transformers + peft as is (SDPA attention);
#   compile  the same peft model wrapped in torch.compile (default mode; compilation happens in
#            the warm-up steps and is reported as time_to_first_step_s);
#   liger    Liger-Kernel's fused RMSNorm / RoPE / SwiGLU / fused linear cross-entropy patched into
#            transformers' Llama/Mistral/Qwen2 before the model is built (needs Triton: GPU only).
# Every row has time_to_first_step_s: from building the model to the end of its first step.
# Each (run, variant) pair runs in a process of its own (Liger's patches are process-wide).
# --device cpu runs the same code on the CPU (to check the script; configs/bench/tiny.json).
import argparse, json, os, subprocess, sys, time
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
import peft
from peft import LoraConfig, get_peft_model

try:
    import ivon
except ImportError:  # ivon-opt is not installed on the GPU machine; scripts/bench/device_bench.sh carries it
    ivon = None

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2 = os.path.join(HERE, "..", "..", "configs", "bench", "llama2_7b.json")


def load_config(path):
    with open(path) as f:
        d = json.load(f)
    model_type = d.pop("model_type", "llama")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    cfg = AutoConfig.for_model(model_type, **d)
    cfg._attn_implementation = "sdpa"
    return cfg


def apply_liger(model_type):
    import liger_kernel.transformers as lk
    patch = {"llama": lk.apply_liger_kernel_to_llama, "mistral": lk.apply_liger_kernel_to_mistral,
             "qwen2": lk.apply_liger_kernel_to_qwen2}[model_type]
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    return getattr(sys.modules.get("liger_kernel"), "__version__", "?")


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def run(shape, opt_name, targets, bsz, seq, steps=8, warm=3, out=None, variant="eager", dev="cuda"):
    cuda = dev == "cuda"
    base = dict(stack="pytorch", variant=variant, opt=opt_name, targets=targets, bsz=bsz, seq=seq,
                shape=os.path.relpath(shape), device_name=torch.cuda.get_device_name() if cuda else "cpu",
                dtype="bf16" if cuda else "f32", steps=steps, warmup=warm,
                version=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                             ivon=getattr(ivon, "__version__", None)))
    if opt_name == "ivon" and ivon is None:
        return emit(dict(base, error="ivon-opt not installed: IVON row skipped"), out)
    torch.manual_seed(0)
    cfg = load_config(shape)
    model = opt = None
    try:
        t_build = time.time()
        if variant == "liger":
            base["version"]["liger_kernel"] = apply_liger(cfg.model_type)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg)
            if cuda:
                model = model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
        params = [p for p in model.parameters() if p.requires_grad]
        if variant == "compile":
            model = torch.compile(model)
        if opt_name == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-4)
        else:
            opt = ivon.IVON(params, lr=0.03, ess=1e6, hess_init=3e-4, beta2=0.99999, weight_decay=1e-6, mc_samples=1)
        ids = torch.randint(0, cfg.vocab_size, (bsz, seq), device=dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        peak_dev = 0
        first_step = None
        for i in range(warm + steps):
            if i == warm:
                sync(dev); t = time.time()
            if opt_name == "adamw":
                loss = model(input_ids=ids, labels=ids).loss; loss.backward()
            else:
                with opt.sampled_params(train=True):
                    loss = model(input_ids=ids, labels=ids).loss; loss.backward()
            opt.step(); opt.zero_grad(set_to_none=True)
            if first_step is None:
                sync(dev); first_step = time.time() - t_build
            if cuda:
                free, total = torch.cuda.mem_get_info()
                peak_dev = max(peak_dev, total - free)
        sync(dev); dt = (time.time() - t) / steps
        n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        tok_s = bsz * seq / dt
        # LoRA step FLOPs ~ 4 * N_frozen per token (forward + input-gradient backward; no weight gradients)
        mfu = 4 * n_base * tok_s / 989e12
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        r = dict(opt=opt_name, targets=targets, bsz=bsz, seq=seq, step_ms=round(dt * 1e3, 1), tokens_per_s=round(tok_s),
                 peak_gib=round(peak, 1), mfu_vs_989=round(mfu, 3), time_to_first_step_s=round(first_step, 1))
        r = dict(base, **r, n_frozen_params=n_base, peak_device_gib=round(peak_dev / 2**30, 2),
                 final_loss=float(loss.item()))
    except torch.OutOfMemoryError as e:
        r = dict(base, error=f"OOM: {str(e).splitlines()[0]}")
    except Exception as e:  # a variant that cannot run here (no Triton for liger, a compile failure)
        r = dict(base, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return emit(r, out)


def emit(r, out):
    print(json.dumps(r), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")
    return r


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", default=[], help="SHAPE:BSZ:SEQ:TARGETS:OPT")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="append one JSON line per run to this file")
    ap.add_argument("--variant", action="append", choices=["eager", "compile", "liger"],
                    help="PyTorch path(s) to time, each run once per variant (default: eager)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    runs = args.run or [f"{LLAMA2}:{b}:{s}:q_proj,v_proj:{o}" for b, s in [(4, 512), (8, 1024)] for o in ["adamw", "ivon"]] \
        + [f"{LLAMA2}:8:1024:all-linear:adamw", f"{LLAMA2}:8:1024:all-linear:ivon"]
    pairs = [(spec, variant) for spec in runs for variant in args.variant or ["eager"]]
    if len(pairs) == 1:
        print(torch.__version__, torch.cuda.get_device_name() if args.device == "cuda" else "cpu", flush=True)
        spec, variant = pairs[0]
        shape, bsz, seq, targets, opt = spec.rsplit(":", 4)
        targets = targets if targets == "all-linear" else targets.split(",")
        run(shape, opt, targets, int(bsz), int(seq), args.steps, args.warmup, args.out, variant, args.device)
        sys.exit(0)
    # One process per (run, variant): Liger-Kernel patches transformers' model classes for the rest
    # of the process, so an eager or compiled model built after a liger run would run Liger's
    # kernels under the wrong label (and a crash in one run would end the rows after it). This
    # parent never touches the GPU, so the children's device-level peaks are their own.
    for spec, variant in pairs:
        cmd = [sys.executable, os.path.abspath(__file__), "--run", spec, "--variant", variant,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
        if args.out:
            cmd += ["--out", args.out]
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"torch_anchor: {spec} {variant} exited with {rc}; going on with the next run", flush=True)
