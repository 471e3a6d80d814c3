"""``python -m aa_compile.distributed.smoke``: a few training steps of a tiny reference
transformer under FSDP2 or tensor parallelism with ``backend="aa"``, to check that a machine or
a cluster runs the recipes of ``docs/distributed.md``. Launch it with ``torchrun``; every rank
prints its losses and the ``aa`` rewrites, rank 0 writes them all to ``--out`` as JSON.
``--save DIR`` writes a distributed checkpoint after the last step and ``--resume DIR`` goes on
from one, on any number of processes (``torchrun --nproc-per-node 1`` included)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from aa_compile.models.transformer import Transformer, TransformerConfig

from .checkpoint import load_checkpoint, save_checkpoint
from .fsdp import rewrites_per_rank, shard_blocks
from .launch import init_from_env
from .tp import parallelize_transformer
from .work import gather_objects, is_writer, rank_of, shard_batch, sum_over_ranks, world_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aa_compile.distributed.smoke", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mode", choices=("fsdp", "tp"), default="fsdp",
                        help="FSDP2 per block, or tensor parallelism of the projections")
    parser.add_argument("--steps", type=int, default=3, help="SGD steps")
    parser.add_argument("--batch", type=int, default=4, help="global batch (rows)")
    parser.add_argument("--inner-compiler", default="eager",
                        help="the aa backend's inner compiler (inductor for real runs)")
    parser.add_argument("--out", default=None, help="JSON of every rank's results (rank 0)")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="write a distributed checkpoint (torch.distributed.checkpoint) "
                             "to DIR after the last step")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="load the checkpoint in DIR first and go on from its step (it may "
                             "come from another number of processes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        raise SystemExit("--steps and --batch must be >= 1")
    group = init_from_env()
    if group is None and os.environ.get("WORLD_SIZE") == "1":  # torchrun, one process
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    if group is None:
        raise SystemExit("run me under torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
                         "-m aa_compile.distributed.smoke")
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                          max_seq_len=16, d_ff=64))
    options = {"inner_compiler": args.inner_compiler}
    ids = torch.randint(0, 64, (args.batch, 9), generator=torch.Generator().manual_seed(1))
    if args.mode == "fsdp":
        forward = shard_blocks(model, compile_options=options)
        ids = shard_batch(ids, group)
    else:
        parallelize_transformer(model, init_device_mesh("cpu", (world_of(group),)))
        forward = torch.compile(model, backend="aa", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = load_checkpoint(args.resume, model, opt) if args.resume else 0
    losses = []
    for _ in range(args.steps):
        logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = sum_over_ranks(loss.detach(), group) / world_of(group) if args.mode == "fsdp" \
            else loss.detach()
        losses.append(round(mean.item(), 6))
    if args.save:
        save_checkpoint(args.save, model, opt, start + args.steps, global_batch=args.batch)
    rewrites = rewrites_per_rank(group)[rank_of(group)]
    print(f"rank {rank_of(group)}: steps {start + 1}-{start + args.steps}: losses {losses}, "
          f"aa rewrites { {k: v for k, v in rewrites.items() if v} }", flush=True)
    everything = gather_objects({"losses": losses, "rewrites": rewrites}, group)
    if is_writer(group) and args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"mode": args.mode, "first_step": start + 1,
                                              "ranks": everything}, indent=2))
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
