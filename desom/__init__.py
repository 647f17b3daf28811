"""Deep Embedded Self-Organizing Maps in Keras 3 (SOMLayer, DESOM, ConvDESOM, Kerasom)."""
