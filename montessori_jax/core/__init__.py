"""The model stack: the Llama decoder, weights in and out, tokenizers and templates, batching
(numpy padding and buckets), sharding, losses as (sum, count), optimizers, orbax state, version
shims. Nothing here knows about stages or the files of a run."""
