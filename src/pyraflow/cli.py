"""The ``pyraflow`` command line: parses arguments and dispatches; the work happens in the modules."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pyraflow.config import load_config, to_yaml


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (sections: schedule, data, model, batching)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set batching.token_budget=4096 (repeatable)",
    )


def _memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=("diffusion_transformer_image", "diffusion_transformer_384p",
                                              "diffusion_transformer_768p"),
                        help="released folders: which transformer (default: the image one for pictures, the first "
                             "video one for videos)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the transformer (and a released folder's text encoders and VAE) in bf16, half the "
                             "memory of fp32")
    parser.add_argument("--offload", action="store_true",
                        help="keep the text encoders, transformer and VAE on the CPU, each moved to the device only "
                             "while it runs (one at a time on the GPU)")
    parser.add_argument("--decode-window", type=_positive_int, metavar="N",
                        help="released folders: latent frames the causal VAE decodes at a time (default 2; 1 saves memory)")
    parser.add_argument("--decode-tile", type=_positive_int, metavar="PX",
                        help="released folders: spatial tile of the VAE decode in pixels, a multiple of 32 (default 512; "
                             "256 saves memory)")


def _memory_kwargs(args) -> dict:
    """The released-folder and memory options of sample / serve, as load_pipeline's keywords."""
    kwargs = {"precision": args.precision, "offload": args.offload}
    if args.variant is not None:
        kwargs["variant"] = args.variant
    if args.decode_window is not None:
        kwargs["decode_window"] = args.decode_window
    if args.decode_tile is not None:
        kwargs["decode_tile"] = args.decode_tile
    return kwargs


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _device(name: str | None):
    """--device as a torch.device (None: the default, CUDA when present), refusing one this machine lacks."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name ({err}); use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyraflow", description="Pyramidal flow matching with a multi-stage MMDiT."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="inspect the resolved configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved configuration with every default")
    _common(show)

    plan = commands.add_parser("plan", help="print the stage schedule and simulate token-budget batches")
    _common(plan)
    plan.add_argument("--schedule", metavar="NAME", help="schedule preset: continuous or pyramid-flow")
    plan.add_argument("--steps", type=_positive_int, default=1000, help="steps to simulate (default 1000)")
    plan.add_argument("--world-size", type=_positive_int, help="ranks to plan for (default 1, or the sequence-parallel "
                      "group size)")
    plan.add_argument("--sequence-parallel", type=_positive_int, metavar="N",
                      help="plan with train.sequence_parallel=N: tokens and activation memory per GPU")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.add_argument("--vae-decode", nargs="?", const="released", metavar="FOLDER",
                      help="instead: the causal video VAE's decode memory for 384p and 768p clips of 5 and 10 s, whole, "
                           "chunked, tiled and as the reference decodes (FOLDER: a released folder; default: the "
                           "released VAE's sizes)")

    train = commands.add_parser("train", help="train (with no arguments: the bundled MNIST demo, ~10 minutes on 2 CPU cores)")
    _common(train)
    train.add_argument("--out", metavar="DIR", help="run directory (default: runs/<dataset>-<date>-<time>)")
    train.add_argument("--max-steps", type=_positive_int, help="stop after this many steps (default: train.steps)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    prepare = commands.add_parser("prepare", help="pre-compute latents and text embeddings into a resumable cache")
    _common(prepare)
    prepare.add_argument("--out", metavar="DIR", help="cache directory (default: data.cache)")
    prepare.add_argument("--layout", choices=("pyraflow", "pyramid-flow"), default="pyraflow",
                         help="pyraflow: a cache of safetensors shards; pyramid-flow: the reference's annotation.jsonl "
                              "with a latent and a text-feature file per clip, made with the released VAE and text "
                              "encoders (latent.kind=pyramid-flow-vae, text.encoder=pyramid-flow)")
    prepare.add_argument("--device", help="where the VAE and text encoders run (default: cuda when present)")

    sample = commands.add_parser("sample", help="pyramidal sampling from a trained run (EMA weights)")
    sample.add_argument("--checkpoint", required=True, metavar="RUN",
                        help="run directory, checkpoints/step-N, or a released Pyramid Flow folder")
    sample.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="caption (repeatable: one row each)")
    sample.add_argument("--num", type=_positive_int, help="samples per prompt (default 8 images, 1 video)")
    sample.add_argument("--steps", type=_positive_int, help="Euler steps per stage (default: the run's sample.steps)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True, metavar="FILE",
                        help="FILE.png: an image grid; FILE.gif or FILE.mp4: videos (plus a contact sheet FILE.png)")
    sample.add_argument("--frames", type=_positive_int, help="video length (default: the run's clip length; for a "
                        "released folder latent frames, each after the first 8 video frames: 16 = 5 s)")
    sample.add_argument("--video-frames", type=_positive_int, metavar="N",
                        help="released folders: video length in video frames, 1 + 8k (121 = 5 s at 24 fps), instead of "
                             "--frames")
    sample.add_argument("--transformer", metavar="RUN",
                        help="with a released folder as --checkpoint: a fine-tune of its transformer (a run, checkpoint "
                        "or model directory) to sample with the folder's encoders and VAE")
    sample.add_argument("--image", metavar="FILE", help="first frame to start the videos from (image-to-video)")
    sample.add_argument("--allow-longer", action="store_true",
                        help="allow --frames beyond the training clip length (history limited to the trained units)")
    sample.add_argument("--no-cache", action="store_true", help="recompute text and history at every step (slower)")
    sample.add_argument("--device", metavar="DEVICE", help="where to sample: cpu, cuda, cuda:1 ... (default: cuda when present)")
    _memory_options(sample)
    sample.add_argument("--height", type=_positive_int, help="picture height in pixels (default: the run's size; any the "
                        "pyramid can halve, also sizes not trained)")
    sample.add_argument("--width", type=_positive_int, help="picture width in pixels (default: the run's size)")

    evaluate = commands.add_parser("eval", help="FID (EfficientNet-Lite0) and, for mnist, digit accuracy of a run's samples")
    evaluate.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory or checkpoints/step-N")
    evaluate.add_argument("--num", type=_positive_int, default=200, help="samples to generate (default 200)")
    evaluate.add_argument("--steps", type=_positive_int, help="Euler steps per stage (default: the run's)")
    evaluate.add_argument("--guidance", type=float, help="guidance scale (default: the run's)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", action="store_true", help="print JSON only")
    evaluate.add_argument("--device", metavar="DEVICE", help="where to sample: cpu, cuda, ... (default: cuda when present)")
    evaluate.add_argument("--solver", choices=("euler", "heun"), help="ODE step per stage (default: the run's)")
    evaluate.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    evaluate.add_argument("--match", type=_non_negative_int, metavar="N",
                          help="samples of training captions for the caption match (default: --num; 0 skips it)")
    evaluate.add_argument("--stages", metavar="FILE.png",
                          help="also measure high-frequency energy at every stage's end and write a grid of the stages")

    convert = commands.add_parser("convert", help="released Pyramid Flow transformers to pyraflow and back")
    convert.add_argument("source", metavar="SOURCE", help="with --from: a released diffusion_transformer_* folder; with "
                         "--to: a pyraflow run, checkpoint or model directory")
    direction = convert.add_mutually_exclusive_group()
    direction.add_argument("--from", dest="from_format", choices=("pyramid-flow",),
                           help="SOURCE is a released folder; write a pyraflow model directory (train.init_from reads it)")
    direction.add_argument("--to", dest="to_format", choices=("pyramid-flow",),
                           help="write a folder the reference's from_pretrained loads (config.json + safetensors)")
    convert.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    convert.add_argument("--merge-lora", action="store_true",
                         help="SOURCE is a LoRA run: fold its adapters into the base (train.init_from) and write the whole "
                              "model (a pyraflow model directory, or with --to a released folder)")
    convert.add_argument("--raw", action="store_true", help="from a checkpoint: its raw weights, not the EMA")
    convert.add_argument("--dtype", choices=("keep", "fp32", "bf16"), default="keep",
                         help="tensor dtype to write (default: as stored)")
    convert.add_argument("--shard-gb", type=float, default=10.0, help="--to: largest shard in GB (default 10)")

    serve = commands.add_parser("serve", help="a page in the browser to sample from a run (Gradio)")
    serve.add_argument("--checkpoint", required=True, metavar="RUN",
                       help="run directory, checkpoints/step-N, or a released Pyramid Flow folder")
    serve.add_argument("--transformer", metavar="RUN", help="with a released folder: a fine-tune of its transformer")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    serve.add_argument("--port", type=_positive_int, default=7860, help="port (default 7860)")
    serve.add_argument("--device", metavar="DEVICE", help="where to sample (default: cuda when present)")
    _memory_options(serve)

    bench = commands.add_parser("bench", help="time training steps of the attention backends (JSON keys in BENCHMARKS.md)")
    _common(bench)  # --config / --set: the config the quality study (--full) trains
    bench.add_argument("--steps", type=_positive_int, default=10, help="timed steps per variant (default 10)")
    bench.add_argument("--warmup", type=_positive_int, default=2, help="untimed steps per variant (default 2)")
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--json", action="store_true", help="print JSON only")
    bench.add_argument("--scales", type=_positive_int, nargs="+", default=None, metavar="S",
                       help="also time pyraflow, the reference's rows and one stage per step with latent sides times S "
                            "(e.g. 2 4; both add ~6 min on 2 CPU cores)")
    bench.add_argument("--data", action="store_true",
                       help="only the data benchmark: peak memory and data wait training from prepared caches of 2,000 "
                            "and 50,000 synthetic samples (~4 GB of temporary files, a few minutes)")
    bench.add_argument("--startup", action="store_true",
                       help="only the start-up benchmark: peak host memory per rank while a 2-rank FSDP2 run sets up from a "
                            "218 M-parameter model directory (~1 GB of temporary files, a few minutes)")
    bench.add_argument("--full", action="store_true",
                       help="also the quality study: train the MNIST demo with 4 stage mixes for equal time, evaluate each")
    bench.add_argument("--minutes", type=float, default=10.0, help="training minutes per variant for --full (default 10)")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="seeds for --full (default 0)")
    bench.add_argument("--out", default="runs/quality-study", metavar="DIR", help="run directories for --full")
    bench.add_argument("--variants", nargs="+", default=None, metavar="V",
                       help="--full: the arms to run (the mixes uniform, 25-50-25, progressive, flat (default: these "
                            "four) and the diagnosis arms patch4, patch8, flat-patch4, flat-patch8, stages2, "
                            "gamma0.1, density-uniform, shift2, equal-samples, 50-30-20)")
    bench.add_argument("--arm", nargs="+", action="append", default=None, metavar="NAME SETTING",
                       help="--full: an arm of your own, NAME then KEY=VALUE settings and/or arm names whose settings "
                            "it takes (e.g. --arm flat-lr6e-3 flat train.lr=6e-3); repeatable")
    bench.add_argument("--only-study", action="store_true", help="--full without the speed benchmark")
    bench.add_argument("--checkpoints", type=_positive_int, default=4,
                       help="--full: checkpoints scored per run, evenly over its steps (FID against minutes; default 4)")
    bench.add_argument("--eval-steps", type=_positive_int, nargs="+", default=None, metavar="N",
                       help="--full: also score each run's final checkpoint at N Euler steps per stage")
    bench.add_argument("--eval-independent-jumps", action="store_true",
                       help="--full: also score each pyramid run sampled without corrective block noise at stage jumps")
    bench.add_argument("--num-eval", type=_positive_int, default=200, help="--full: samples per FID (default 200)")
    return parser


def _convert(args) -> int:
    from pathlib import Path

    import torch

    from pyraflow import convert

    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out, shard_bytes = Path(args.out), int(args.shard_gb * 2**30)
    if not (args.from_format or args.to_format or args.merge_lora):
        raise ValueError("say what to convert: --from pyramid-flow (a released folder), --to pyramid-flow (a pyraflow "
                         "model) or --merge-lora (a LoRA run).")
    if args.from_format:
        if args.merge_lora:
            raise ValueError("--merge-lora reads a pyraflow LoRA run; it does not go with --from.")
        config = convert.import_reference(args.source, out, dtype)
        print(f"pyraflow convert: {args.source} -> {out} (model.arch {config.arch}, {config.depth} + "
              f"{config.single_depth} blocks, width {config.width}); train from it with train.init_from={out}")
        return 0
    if args.merge_lora:
        _, read = convert.merge_lora(args.source, out, args.raw, dtype, bool(args.to_format), shard_bytes)
        kind = "a released folder" if args.to_format else "a pyraflow model directory"
        print(f"pyraflow convert: {read} + its base -> {out} ({kind}, adapters merged)")
        return 0
    reference = convert.export_reference(args.source, out, args.raw, dtype, shard_bytes)
    print(f"pyraflow convert: {args.source} -> {out} ({reference['_class_name']}); the reference loads it with "
          f"{reference['_class_name']}.from_pretrained('{out}')")
    return 0


def _logged_config(args, level: str):
    """The command's config (--config and --set), with pyraflow's log lines shown from ``level`` up."""
    import logging

    logging.basicConfig(level=level, format="%(message)s")
    return load_config(args.config, args.overrides)


def _train(args) -> int:
    from pyraflow.train import TrainingStopped, run_training

    config = _logged_config(args, "INFO")
    try:
        summary = run_training(config, args.out, resume=args.resume, max_steps=args.max_steps, progress=not args.quiet)
    except TrainingStopped as err:
        print(f"pyraflow train: stopped: {err}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        run = summary["run_dir"]
        print(f"trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min ({summary['precision']}); "
              f"checkpoint {run}/checkpoints/latest, samples in {run}/samples, loss plot {run}/loss.png")
    return 0


def _prepare(args) -> int:
    from pyraflow.data import prepare
    from pyraflow.latents import build_latent_space
    from pyraflow.text import load_text_encoder

    config = _logged_config(args, "WARNING")
    out = args.out or config.data.cache
    if not out:
        raise ValueError("give --out DIR (or set data.cache) for the cache directory.")
    from pyraflow.sample.pipeline import default_device

    device = _device(args.device) or default_device()
    if args.layout == "pyramid-flow":
        from pyraflow.data.extract import extract

        result = extract(config, out, device)
        print(f"{result['annotations']}: {result['rows']} rows; wrote {result['written']}, reused {result['reused']}, "
              f"skipped {result['skipped']} unreadable file(s)")
        for entry in result["skipped_files"][:10]:
            print(f"  skipped {entry['path']}: {entry['reason']}")
        return 0
    result = prepare(config.data, out, load_text_encoder(config.text, device), build_latent_space(config.latent, device))
    print(f"cache {out}: {result['samples']} samples in {result['shards']} shard(s); wrote {result['written']}, "
          f"reused {result['reused']}, skipped {result['skipped']} unreadable file(s)")
    for entry in result.get("skipped_files", [])[:10]:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    return 0


def _sample(args) -> int:
    from pathlib import Path

    from pyraflow.media import VIDEO_SUFFIXES, contact_sheet, write_image, write_video
    from pyraflow.sample import load_pipeline

    if not args.prompt:
        raise ValueError("give at least one --prompt TEXT (e.g. --prompt 'a handwritten digit seven').")
    out = Path(args.out)
    if args.video_frames is not None:
        from pyraflow.interop.vae import check_frame_count
        from pyraflow.sample.released import is_released_root

        if args.frames is not None:
            raise ValueError("give --frames (latent frames) or --video-frames (video frames), not both.")
        if not is_released_root(args.checkpoint):
            raise ValueError("--video-frames counts the causal VAE's video frames of a released folder; for a run, "
                             "give --frames.")
        args.frames = check_frame_count(args.video_frames)
    wants_video = args.frames is not None or args.image is not None
    if wants_video and out.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--out {out} must end in .gif or .mp4 when --frames or --image is given.")
    if not wants_video and out.suffix.lower() not in VIDEO_SUFFIXES + (".png", ".jpg", ".jpeg"):
        raise ValueError(f"--out {out} must end in .png (an image grid), .gif or .mp4 (videos).")
    pipeline = load_pipeline(args.checkpoint, _device(args.device), video=out.suffix.lower() in VIDEO_SUFFIXES,
                             transformer=args.transformer, **_memory_kwargs(args))
    steps = [args.steps] * pipeline.schedule.num_stages if args.steps else None
    size = None
    if args.height or args.width:
        side = pipeline.config.data.resolution or pipeline.config.data.image_size
        size = (args.height or side, args.width or side)
        pipeline.latent_shape(size)  # refuses a size the pyramid cannot halve, naming the nearest
    if out.suffix.lower() in VIDEO_SUFFIXES:
        from pyraflow.data import read_image

        num = args.num or 1
        image = read_image(args.image, pipeline.config.data.channels) if args.image else None
        frames = args.frames or pipeline.default_frames()
        prompts = [p for p in args.prompt for _ in range(num)]
        pixels, timings = pipeline.video(prompts, frames, args.seed, image, steps, args.guidance, args.allow_longer,
                                         use_cache=False if args.no_cache else None, size=size)
        write_video(pixels, out, rows=len(args.prompt))
        sheet = out.with_suffix(".png")
        write_image(contact_sheet(pixels), sheet)
        units = ", ".join(f"{t:.2f}" for t in timings)
        print(f"wrote {out} and {sheet} ({len(prompts)} video(s) of {pixels.shape[2]} frames); seconds per unit: {units}")
        return 0
    timings = pipeline.grid(args.prompt, args.num or 8, out, seed=args.seed, steps=steps, guidance=args.guidance,
                            size=size)
    stages = ", ".join(f"stage {k}: {t:.2f} s" for k, t in enumerate(timings))
    print(f"wrote {args.out} ({len(args.prompt)} x {args.num or 8}); time per stage: {stages}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            print(to_yaml(load_config(args.config, args.overrides)), end="")
        elif args.command == "plan" and args.vae_decode:
            from pyraflow.memory import format_vae_table, vae_decode_table

            table = vae_decode_table(None if args.vae_decode == "released" else args.vae_decode, progress=not args.json)
            print(json.dumps(table, indent=2) if args.json else format_vae_table(table))
        elif args.command == "plan":
            from pyraflow.plan import format_report, plan_report

            overrides = list(args.overrides)
            if args.schedule:
                overrides.append(f"schedule.preset={args.schedule}")
            if args.sequence_parallel:
                overrides.append(f"train.sequence_parallel={args.sequence_parallel}")
            config = load_config(args.config, overrides)
            report = plan_report(config, args.steps, args.world_size or config.train.sequence_parallel,
                                 progress=not args.json)
            print(json.dumps(report, indent=2) if args.json else format_report(report))
        elif args.command == "train":
            return _train(args)
        elif args.command == "prepare":
            return _prepare(args)
        elif args.command == "sample":
            return _sample(args)
        elif args.command == "convert":
            return _convert(args)
        elif args.command == "serve":
            from pyraflow.serve import serve

            print(f"pyraflow serve: loading {args.checkpoint} ...", flush=True)
            serve(args.checkpoint, args.host, args.port, _device(args.device), transformer=args.transformer,
                  **_memory_kwargs(args))
        elif args.command == "eval":
            from pyraflow.evaluation import evaluate

            result = evaluate(args.checkpoint, args.num, args.seed, args.steps, args.guidance, progress=not args.json,
                              device=_device(args.device), solver=args.solver, use_ema=not args.raw,
                              stages=args.stages, match=args.match)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                print(f"FID (EfficientNet-Lite0) vs {result['fid_reference']}: {result['fid_efficientnet_lite0']:.1f} "
                      f"({result['num_samples']} samples)")
                if result.get("digit_accuracy") is not None:
                    print(f"digit accuracy: {100 * result['digit_accuracy']:.1f}% (classifier on held-out digits: "
                          f"{100 * result['classifier_heldout_accuracy']:.1f}%)")
                elif "digit_accuracy_error" in result:
                    print(f"digit accuracy: not scored ({result['digit_accuracy_error']})")
                matched = result.get("caption_match")
                if matched:
                    print(f"caption match: {100 * matched['top1']:.1f}% of {matched['num_samples']} samples nearest to "
                          f"their own caption's picture, {100 * matched['top5']:.1f}% within the nearest 5 (chance "
                          f"{100 * matched['chance_top1']:.2f}% / {100 * matched['chance_top5']:.2f}%; "
                          f"{matched['reference']})")
                    if matched["rank_mean"] is not None:
                        print(f"caption match: on average {matched['rank_mean']:.1f} other pictures lie nearer than the "
                              f"caption's own (chance {matched['chance_rank_mean']:.1f})")
                elif "caption_match_error" in result:
                    print(f"caption match: not scored ({result['caption_match_error']})")
                if "hf_energy" in result:
                    hf = result["hf_energy"]
                    print(f"high-frequency energy: generated {hf['generated']:.4f}, real {hf['real']:.4f}")
                for st in result.get("stages", []):
                    print(f"  end of stage {st['stage']}: high-frequency energy {st['hf_energy_generated']:.4f} "
                          f"(expected {st['hf_energy_expected']:.4f})")
        elif args.command == "bench":
            from pyraflow.bench.speed import format_bench, run_bench

            if args.data:
                from pyraflow.bench.data import data_benchmark, format_data

                result = {"data": data_benchmark(progress=not args.json)}
                print(json.dumps(result, indent=2) if args.json else format_data(result["data"]))
                return 0
            if args.startup:
                from pyraflow.bench.startup import format_startup, startup_memory

                result = {"startup": startup_memory(progress=not args.json)}
                print(json.dumps(result, indent=2) if args.json else format_startup(result["startup"]))
                return 0
            if args.only_study and not args.full:
                raise ValueError("--only-study goes with --full (the quality study); add --full.")
            result = {} if args.only_study else run_bench(steps=args.steps, warmup=args.warmup, threads=args.threads,
                                                          progress=not args.json, scales=args.scales)
            if args.full:
                from pyraflow.bench.study import quality_study

                arms = {}
                for arm in args.arm or []:
                    if len(arm) < 2:
                        raise ValueError(f"--arm {' '.join(arm)}: give a name and at least one KEY=VALUE setting or "
                                         "arm name, e.g. --arm flat-lr6e-3 flat train.lr=6e-3")
                    arms[arm[0]] = arm[1:]
                result["quality"] = quality_study(args.out, args.minutes, args.seeds, num_eval=args.num_eval,
                                                  progress=not args.json, config_path=args.config,
                                                  overrides=args.overrides, variants=args.variants, arms=arms, checkpoints=args.checkpoints,
                                                  eval_steps=args.eval_steps,
                                                  eval_independent_jumps=args.eval_independent_jumps)
            if args.json:
                print(json.dumps(result, indent=2))
            elif args.only_study:
                from pyraflow.bench.study import format_study

                print(format_study(result["quality"]))
            else:
                print(format_bench(result))
    except (ValueError, FileNotFoundError) as err:
        print(f"pyraflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyraflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
