"""Host backend (CPU via LLVM, NVIDIA GPU via CUDA): TVM Relax builds run by TVM's runtime, not firmware."""
