"""Bytes in and out: file formats, tensor names, memory-mapped reading, vocabularies, atomic outputs, shipped data, weight sources."""
