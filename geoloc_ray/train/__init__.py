"""Training on Ray Train: stage 0 (unified, aligned), three experts (stage 1, mining, stage 2), the gate."""
