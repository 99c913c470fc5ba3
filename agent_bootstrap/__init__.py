"""The provider's side of DarkGPU: `darkgpu auth`, `darkgpu serve`, `darkgpu status`.

GPU detection (agent_bootstrap.nvml), the X25519 key, `provider.toml`, credentials, joining and
leaving the Ray cluster, the schedule and idle detection, the installer and systemd unit.
"""
