"""One module per CLI command: glue between parsed arguments and the library."""
