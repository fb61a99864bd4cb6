"""What a model is worth: perplexity, zero-shot tasks, packed evaluation, the per-layer and per-op
diff against float and against the HTP, and the report.
"""
