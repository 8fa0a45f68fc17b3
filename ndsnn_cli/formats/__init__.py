"""The file formats ndsnn writes and reads, in one home below every reader and writer.

`csr`: the `ndsnn-csr` artefact (name, version, parts, dtypes, column encodings); `graph`: the op list
that the artefact stores and every runtime and exporter reads; `checkpoint`: the checkpoint's name,
version and tensor keys. These modules import nothing of ndsnn but `errors` and `limits`, so the
validator, the writers (export/, checkpoint.py) and the readers all stand on them.
"""
