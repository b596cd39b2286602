"""Few-shot adaptation: PEFT methods over foundation models, trained on a handful of labelled cases."""
