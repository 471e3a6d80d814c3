"""Ahead-of-time compilation of every Triton kernel of aa_compile for real NVIDIA GPUs, on a
machine without one.

`cases` lists the library calls (each op's CUDA kernel at realistic LLM shapes), `launches`
records the kernel launches they make for a given compute capability (nothing runs: Triton's
JIT hook stops each launch before it compiles), `build` compiles a recorded launch down to a
cubin with ptxas and reads registers, spills and shared memory, and `__main__` does all of it
for a list of architectures and writes a JSON file and a table (``python -m tests.triton_aot
--help``). ``tests/test_triton_aot.py`` runs it and turns each (case, architecture) into a
test. The recording process must not run the Triton interpreter (``TRITON_INTERPRET``).
"""
