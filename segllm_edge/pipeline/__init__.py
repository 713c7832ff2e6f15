"""The numpy steps around the graphs: image input and preprocessing, tokenizer, instance selection, mask
post-process and crop. No torch; the PyTorch reference in modeling/ is what they are tested against."""
