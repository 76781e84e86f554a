"""DeepSpeed pre-training: engine, loop, checkpoint/resume, TensorBoard (``python -m pipeline.train``)."""
