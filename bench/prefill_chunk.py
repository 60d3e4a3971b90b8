"""Cost of one batch step with a prompt chunk: how to pick ``[model] prefill_chunk``.

One step = one decoding token of each of 3 sequences + ``c`` prompt tokens of a 4th, one
``llama_decode``, on the worker's context layout (4 sequences, a KV stream each). Prints
the step time (the pause a newcomer's chunk inflicts on running streams) and the cost per
prompt token for several ``c``. Usage: ``python -m bench.prefill_chunk [--threads N]``.
"""

from __future__ import annotations

import argparse
import time

import llama_cpp.llama_cpp as L

from supervisor.default_model import default_model_path

CHUNKS = (0, 16, 32, 64, 128, 256, 384)
RUNNING = 3
HISTORY = 100  # tokens already cached in each running sequence


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(args.model.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 4 * 1024, 512, 512
    cp.n_seq_max, cp.kv_unified = RUNNING + 1, False
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> float:
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(entries)
        t = time.perf_counter()
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return time.perf_counter() - t

    for s in range(RUNNING):
        decode([(100 + j, j, s, j == HISTORY - 1) for j in range(HISTORY)])
    print(f"chunk  step_ms  ms/prompt_token   ({RUNNING} decoding + a chunk, {args.threads} threads)")
    for c in CHUNKS:
        best = float("inf")
        for _ in range(args.repeats):
            step = [(200, HISTORY, s, True) for s in range(RUNNING)]
            best = min(best, decode(step + [(300 + j, j, RUNNING, False) for j in range(c)]))
            for s in range(RUNNING):
                L.llama_memory_seq_rm(mem, s, HISTORY, -1)
            L.llama_memory_seq_rm(mem, RUNNING, -1, -1)
        per = f"{best * 1000 / c:.2f}" if c else "-"
        print(f"{c:5d}  {best * 1000:7.1f}  {per}")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
