"""What every task's training shares: configs and flags, the run (directory, checkpoint schema,
resume, signals), the optimizer step's pieces (accumulation, scaler, clipping, EMA, schedule), run
logging (TensorBoard, W&B, MLflow), the optimizer (timm's, fused where PyTorch has the kernel), the
process group, seeding. Devices, precision and progress bars are the inference layer's
(:mod:`rmt.runtime`), which training builds on."""
from .checkpoint import Progress, RunCheckpoint, read_run_checkpoint
from .config import DenseRunConfig, RunConfig, load_config, option
from .run import RoundSpec, RunResult, TrainingRun
from .step import OptimizerStep

__all__ = ["Progress", "RunCheckpoint", "read_run_checkpoint", "DenseRunConfig", "RunConfig", "load_config", "option",
           "RoundSpec", "RunResult", "TrainingRun", "OptimizerStep"]
