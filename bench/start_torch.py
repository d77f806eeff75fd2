#!/usr/bin/env python3
"""The PyTorch side of `npm run bench:start` (bench/start.ts runs it in a fresh process per measurement).

    python3 bench/start_torch.py probe
    python3 bench/start_torch.py load --impl safetensors|transformers --dir DIR --device cuda|cpu

probe: one JSON line saying what imports here: {"torch": version or null, "safetensors", "transformers",
"cuda": torch sees a GPU, "device": its name, "reason": why torch cannot be used, when it cannot}.

load: opens the checkpoint in DIR (model.safetensors.index.json and its shards, or model.safetensors) the way a
PyTorch user does, timed from before the device is initialised to the weights on it (synchronised):
  safetensors   safetensors.torch.load_file(shard, device=DEVICE) for every shard
  transformers  AutoModelForCausalLM.from_pretrained(DIR, dtype=bfloat16, device_map=DEVICE)
                (without accelerate, device_map is refused: then from_pretrained(...).to(DEVICE), said in "method")
Then, untimed, checks the weights: every tensor finite (safetensors), or a forward over a few tokens gives finite
logits (transformers). Prints one JSON object on stdout: {impl, seconds, initSeconds, loadSeconds, bytes, tensors,
finite, method, torch, transformers, device,
readyAtMs (the wall clock at ready, for the parent's process time)}; progress on stderr. Bad input or a failed load: exit 2 (bad input) or
1, one line on stderr.
"""
import argparse
import json
import os
import sys
import time


def progress(line):
    print(f"start_torch: {line}", file=sys.stderr, flush=True)


def fail(message, code=1):
    print(f"start_torch: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def probe():
    out = {"torch": None, "safetensors": None, "transformers": None, "cuda": False, "device": None}
    try:
        import torch
        out["torch"] = torch.__version__
        out["cuda"] = bool(torch.cuda.is_available())
        if out["cuda"]:
            out["device"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 - any import failure means the same here
        out["reason"] = f"cannot import torch: {type(e).__name__}: {e}"
    try:
        import safetensors
        out["safetensors"] = safetensors.__version__
    except Exception as e:  # noqa: BLE001
        out.setdefault("reason", f"cannot import safetensors: {type(e).__name__}: {e}")
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        out["transformersReason"] = f"cannot import transformers: {type(e).__name__}: {e}"
    print(json.dumps(out))


def shard_files(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    fail(f"{directory}: no model.safetensors.index.json or model.safetensors", 2)


def version_at_least(version, major, minor):
    parts = version.split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def load(args):
    import torch

    files = shard_files(args.dir)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        fail("torch sees no CUDA device", 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")
        sync()
    t1 = time.perf_counter()
    result = {"impl": args.impl, "torch": torch.__version__, "transformers": None, "method": ""}
    if args.impl == "safetensors":
        from safetensors.torch import load_file

        tensors = {}
        for path in files:
            tensors.update(load_file(path, device=args.device))
        sync()
        t2 = time.perf_counter()
        ready_at = time.time()
        result["method"] = f"safetensors.torch.load_file(shard, device='{args.device}') x {len(files)}"
        result["tensors"] = len(tensors)
        result["bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        result["finite"] = all(bool(torch.isfinite(t).all()) for t in tensors.values())
    else:
        import transformers
        from transformers import AutoModelForCausalLM

        result["transformers"] = transformers.__version__
        # transformers 4.56 renamed torch_dtype to dtype; older versions would take dtype as a config field.
        dtype_arg = "dtype" if version_at_least(transformers.__version__, 4, 56) else "torch_dtype"
        kwargs = {dtype_arg: torch.bfloat16}
        try:
            model = AutoModelForCausalLM.from_pretrained(args.dir, device_map=args.device, **kwargs)
            result["method"] = f"from_pretrained({dtype_arg}=bfloat16, device_map='{args.device}')"
        except (ImportError, ValueError) as e:
            if "accelerate" not in str(e):
                raise
            progress(f"device_map needs accelerate ({e}); loading with .to('{args.device}') instead")
            t1 = time.perf_counter()  # the refused attempt is not counted
            model = AutoModelForCausalLM.from_pretrained(args.dir, **kwargs).to(args.device)
            result["method"] = f"from_pretrained({dtype_arg}=bfloat16).to('{args.device}') (no accelerate)"
        sync()
        t2 = time.perf_counter()
        ready_at = time.time()
        params = list(model.parameters())
        result["tensors"] = len(params)
        result["bytes"] = sum(p.numel() * p.element_size() for p in params)
        dtypes = sorted({str(p.dtype) for p in params})
        devices = sorted({str(p.device.type) for p in params})
        if dtypes != ["torch.bfloat16"] or devices != [args.device]:
            fail(f"from_pretrained gave parameters of {dtypes} on {devices}, not bfloat16 on {args.device}")
        with torch.no_grad():
            logits = model(torch.tensor([[0, 5, 7, 11]], device=args.device)).logits
        result["finite"] = bool(torch.isfinite(logits).all())
    result["initSeconds"] = t1 - t0
    result["loadSeconds"] = t2 - t1
    result["seconds"] = t2 - t0
    result["readyAtMs"] = ready_at * 1000
    result["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    progress(f"{args.impl}: {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.2f} s")
    print(json.dumps(result))


def main(argv):
    parser = argparse.ArgumentParser(prog="start_torch.py")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("probe")
    p = sub.add_parser("load")
    p.add_argument("--impl", choices=("safetensors", "transformers"), required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    args = parser.parse_args(argv)
    if args.command == "probe":
        return probe()
    try:
        load(args)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the caller gets the reason in one line
        fail(f"{args.impl}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


if __name__ == "__main__":
    main(sys.argv[1:])
