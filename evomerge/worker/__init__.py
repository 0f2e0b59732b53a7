"""Search workers: a resident model per device, merged in place and scored with lm-eval per candidate."""
