"""The model tasks a run can have (``model.task``): the head the backbone gets and how it is scored."""

CAUSAL_LM = "causal_lm"  # next-token loss on the completion; scored by lm-eval
SEQUENCE_CLASSIFICATION = "sequence_classification"  # a classifier head; scored on the data's test split
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)
