"""Training scaffolding shared by ``moekit finetune`` and ``moekit pretrain``.

The two commands differ by configuration, not by loops: both build a config that
inherits :class:`TrainingOptions`, then run the same pipeline:

    data.load_source -> data.detect_format -> data.split_heldout -> data.to_sft_dataset
    trainer.check (require_train_extra / require_4bit) -> trainer.precision -> trainer.load_model
    trainer.prepare_run -> trainer.sft_config -> trainer.build_trainer -> trainer.train
    trainer.save_final -> output.publish (card, recipe, logs; atomic)

``launch.relaunch`` re-runs a command under ``accelerate launch`` (ddp, fsdp2, zero2,
zero3 configs ship in ``moekit/accelerate_configs``). Everything logs through
``moekit.train.log.logger``; the CLI prints it.
"""

from moekit.train.options import TrainingOptions, run_dir

__all__ = ["TrainingOptions", "run_dir"]
