"""What every task's training shares: configs and flags, the run (directory, checkpoint schema,
resume, optimizer step, EMA, signals), run logging (TensorBoard, W&B, MLflow), the optimizer (timm's,
fused where PyTorch has the kernel), processes and devices, precision, seeding, atomic files."""
from .checkpoint import Progress, RunCheckpoint, read_run_checkpoint
from .config import DenseRunConfig, RunConfig, load_config, option
from .run import RoundSpec, RunResult, TrainingRun

__all__ = ["Progress", "RunCheckpoint", "read_run_checkpoint", "DenseRunConfig", "RunConfig", "load_config", "option",
           "RoundSpec", "RunResult", "TrainingRun"]
