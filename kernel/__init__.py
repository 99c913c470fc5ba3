"""The dependency-free kernel shared by every part, the provider's agent included: money, ids and
token formats, label and resource names, Redis key names. The standard library only."""
