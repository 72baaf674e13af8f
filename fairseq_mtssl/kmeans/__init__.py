"""HuBERT's k-means label recipe: dump features, learn k-means, apply it (``.km`` + ``dict.km.txt``)."""
