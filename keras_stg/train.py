"""`python -m keras_stg.train`: the training command (see `keras_stg.experiments.train`)."""

from keras_stg.experiments.train import main

if __name__ == "__main__":
    main()
