"""What a node is: label and resource names, the model catalog and placement, local start-up."""
