"""digits: a class-conditional DDPM U-Net trained on scikit-learn's bundled 8x8 digits, with a
trained classifier for rewards and a digits-FID. Everything trains here, offline."""
