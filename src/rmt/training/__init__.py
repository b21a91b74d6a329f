"""What every task's training shares: configs and flags, the run (directory, checkpoint schema,
resume, signals), the optimizer step's pieces (accumulation, scaler, clipping, EMA, schedule), run
logging (TensorBoard, W&B, MLflow), the optimizer (timm's, fused where PyTorch has the kernel),
processes and devices, precision, seeding, atomic files."""
from .checkpoint import Progress, RunCheckpoint, read_run_checkpoint
from .config import DenseRunConfig, RunConfig, load_config, option
from .run import RoundSpec, RunResult, TrainingRun
from .step import OptimizerStep

__all__ = ["Progress", "RunCheckpoint", "read_run_checkpoint", "DenseRunConfig", "RunConfig", "load_config", "option",
           "RoundSpec", "RunResult", "TrainingRun", "OptimizerStep"]
