"""The CUDA path: kernel factories (:mod:`.kernels`), array handling and launches
(:mod:`.launch`), and PTX/ptxas checks without a GPU (:mod:`.ptx`)."""
