from .train import bench_train

__all__ = ["bench_train"]
