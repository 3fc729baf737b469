"""The leaf every layer shares: the names of the export contract (`names`) and the export directory's format
(`manifest`: tpc.json and its samples, typed, with one reader and one writer). numpy and jsonschema only."""
