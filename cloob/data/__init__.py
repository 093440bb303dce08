"""Data: webdataset shards in img2dataset's layout, streamed from any fsspec URL."""
