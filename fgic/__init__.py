"""fgic: fine-grained image classification, the same recipe on 1 process or N."""
