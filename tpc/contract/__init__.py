"""The leaf every layer shares: the names of the export contract (`names`), the export directory's format
(`manifest`: tpc.json and its samples, typed, with one reader and one writer) and tpc.json's step protocols
(`protocols`: a VLM's generation, a policy's control step, as frozen dataclasses). numpy and jsonschema only."""
