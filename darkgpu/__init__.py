"""The `darkgpu` command: operator and provider subcommands."""
