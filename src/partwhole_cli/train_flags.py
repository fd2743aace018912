"""absl flags of ``src/main.py`` (stage 3). Only CLI scripts read these.

Every flag of the reference (`distill-part-whole` / `mmlab-cv/Agglomerator`)
exists with the same name and default, so the published flagfiles parse
unchanged; ours follow under "Added".
"""

from absl import flags

from partwhole.common.image_folders import EMBEDS_SUFFIX

# ----------------------------------------------------------------------------- reference flags
flags.DEFINE_string("dataset", "IMAGENETTE", "Dataset: IMAGENETTE, TOY, CIFAR10, CIFAR100, MNIST, FashionMNIST, smallNORB, IMAGENET.")
flags.DEFINE_string("exp_name", "IMAGENETTE", "Experiment name (run folder runs/<exp_name>/...).")

flags.DEFINE_integer("patch_size", 1, "Patch size on the tokenizer's feature map (conv_image_size / patch_size columns per side).")
flags.DEFINE_integer("patch_dim", 128, "Dimension d of every level vector.")
flags.DEFINE_integer("batch_size", 1024, "Batch size per device.")
flags.DEFINE_integer("levels", 2, "Levels per column.")
flags.DEFINE_bool("supervise", False, "Fine-tune: train the classification head on the top level (needs --resume_training).")
flags.DEFINE_integer("image_size", 32, "Input image size (square).")
flags.DEFINE_integer("conv_image_size", 8, "Size after the conv tokenizer: must be image_size/4.")
flags.DEFINE_integer("n_channels", 3, "Image channels.")
flags.DEFINE_integer("n_classes", 10, "Number of classes.")
flags.DEFINE_integer("iters", None, "GLOM iterations (default 2*levels).")
flags.DEFINE_integer("denoise_iter", -1, "Which iteration's top level feeds the heads (-1: the last).")
flags.DEFINE_float("dropout", 0.3, "Dropout of the contrastive head (supcon).")
flags.DEFINE_float("temperature", 0.07, "Contrastive temperature (supcon).")
flags.DEFINE_integer("contr_dim", 512, "Contrastive feature dimension (supcon).")
flags.DEFINE_bool("levels_encoder", False, "Map the final levels through a column encoder before the distillation loss.")

flags.DEFINE_enum("mode", "train", ["train", "test", "freeze", "islands"], "train, test, freeze (export features) or islands (draw them).")
flags.DEFINE_float("learning_rate", 0.05, "Peak learning rate.")
flags.DEFINE_float("lr_speed", 2000, "Unused by the reference and by us; kept so reference flagfiles parse.")
flags.DEFINE_boolean("resume_training", False, "Start from --load_checkpoint_dir: continue the same run, or load its weights for a new stage.")
flags.DEFINE_string("load_checkpoint_dir", "path_to_checkpoint.ckpt", "Checkpoint file to resume from, fine-tune, test, freeze or draw.")
flags.DEFINE_integer("seed", 42, "Random seed (honoured: python, numpy, torch, data workers).")
flags.DEFINE_integer("max_epochs", 10000, "Training epochs.")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay.")
flags.DEFINE_integer("num_workers", 8, "Data loader workers per process.")
flags.DEFINE_integer("num_gpus", 1, "GPUs per node, one process each (more than present: what is there, with a warning). "
                     "Where a GPU is visible and --num_gpus >= 1 it wins over --num_processes.")
flags.DEFINE_integer("num_processes", 1, "CPU processes per node (DDP over gloo), used when no GPU is: none visible, or "
                     "--num_gpus=0. For CPU nodes, and to run the several-device path without a GPU.")

flags.DEFINE_float("limit_train", 1.0, "Fraction (<=1.0) or number (>1) of train batches per epoch.")
flags.DEFINE_float("limit_val", 1.0, "Fraction or number of val batches.")
flags.DEFINE_float("limit_test", 1.0, "Fraction or number of test batches.")

flags.DEFINE_bool("plot_islands", False, "Draw islands of agreement into <run>/islands (and the logger) during runs.")

# ----------------------------------------------------------------------------- added
flags.DEFINE_enum("pretrain_objective", "sam_distill", ["sam_distill", "supcon"],
                  "Pretraining objective when not --supervise: sam_distill (the paper) or supcon (original Agglomerator).")
flags.DEFINE_bool("finetune_backbone", False, "With --supervise, also train the backbone (default: frozen, as the reference).")
flags.DEFINE_list("level_weights", ["0.1", "0.2", "0.7"], "sam_distill loss weight per level, low to high.")
flags.DEFINE_enum("teacher_norm", "none", ["none", "dataset", "layer"],
                  "sam_distill targets: none (the reference: raw embeddings), dataset (z-scored per dimension with "
                  "train-set statistics, so the loss weighs how masks differ rather than the embeddings' common mean) or "
                  "layer (each target whitened over its own dimensions: a LayerNorm without affine).")
flags.DEFINE_enum("distill_loss", "mse", ["mse", "smooth_l1", "cosine"],
                  "sam_distill loss per column and level: mse (the reference), smooth_l1 (Huber, beta 1) or cosine "
                  "(1 - cosine similarity: the direction of each target only).")
flags.DEFINE_integer("levels_encoder_dim", 256, "Output dimension of the levels encoder (the teacher's D).")
flags.DEFINE_enum("levels_encoder_norm", "columns", ["columns", "features"],
                  "LayerNorms of the levels encoder: over the columns (the reference; erases what all columns of an "
                  "image share) or over each column's features (docs/toy_study.md).")
flags.DEFINE_enum("optimizer", "lion", ["lion", "adamw"], "Optimizer: lion (timm.optim.Lion, the reference's) or adamw.")
flags.DEFINE_list("lion_betas", ["0.95", "0.98"], "Lion betas (reference values).")
flags.DEFINE_enum("scheduler", "onecycle", ["onecycle", "constant"], "Learning-rate schedule (OneCycle over the real number of steps).")
flags.DEFINE_string("data_dir", "datasets", "Folder holding the datasets (imagenette2/, toy/, CIFAR10/, ...).")
flags.DEFINE_string("embeds_suffix", EMBEDS_SUFFIX, "sam_distill teacher: embeddings in <root>/<split><embeds_suffix> "
                    "(e.g. _masks_embeds_random for a second teacher's files).")
flags.DEFINE_float("val_from_train", 0.0, "Image-folder datasets: hold out this seeded fraction of train (per class) as "
                   "the validation split and keep the val folder as the test split only, to tune without touching it. "
                   "0: val = test = the val folder (the reference).")
flags.DEFINE_string("unlabelled_dir", "", "sam_distill pretraining on image folders: more training images, labels unused: "
                    "an image folder <dir>/<any folder>/<img> whose stage-2 embeddings lie in <dir><embeds_suffix> (the "
                    "train split's layout, e.g. datasets/unlabelled/toy/train and .../train_masks_embeds). The validation "
                    "and test splits are unchanged. Empty: none.")
flags.DEFINE_string("output_dir", "", "Run folder (default runs/<exp_name>/<time>-<objective>).")
flags.DEFINE_bool("overwrite", False, "Train into an --output_dir that holds another run's checkpoints, deleting that run "
                  "(checkpoints, logs, results). Without it such a folder is refused, unless this is a --resume_training of "
                  "its own checkpoints/last.ckpt.")
flags.DEFINE_enum("logger", "csv", ["csv", "tensorboard", "wandb", "none"], "Metrics logger (wandb is optional).")
flags.DEFINE_string("precision", "auto",
                    "auto (bf16-mixed where the device computes bf16 natively, else 32), 32, bf16-mixed or 16-mixed.")
flags.DEFINE_integer("num_nodes", 1, "Nodes for multi-node DDP (with --num_gpus or --num_processes per node; under SLURM, "
                     "srun starts one task per device; otherwise set MASTER_ADDR, MASTER_PORT and NODE_RANK on each node). "
                     "Needs --output_dir (the same folder, on a shared file system, on every node).")
flags.DEFINE_integer("ddp_timeout", 600, "Several processes: seconds a process waits for the others in one collective "
                     "before it gives up (a peer that died is noticed at once; this bounds a peer that hangs).")
flags.DEFINE_integer("plot_every", 50, "With --plot_islands: draw every N training steps (and the first val/test batch).")
flags.DEFINE_string("islands_split", "val", "--mode islands: split whose images are drawn.")
flags.DEFINE_integer("islands_count", 8, "--mode islands: how many images of --islands_split to draw.")
flags.DEFINE_list("islands_images", [], "--mode islands: image files to draw instead of a split.")
flags.DEFINE_bool("islands_animate", False, "--mode islands: also watch the islands form: per image an animated GIF "
                  "(one frame per iteration, initial state first) and a strip PNG (level x iteration) in <run>/islands/iterations.")
flags.DEFINE_bool("islands_html", False, "--mode islands: also write <run>/islands.html, the islands explorer: one "
                  "self-contained page (opens from disk) where a click on a column shows its cosine similarity to every "
                  "column at every level and iteration, its stage-1 masks and the image's islands scores.")
flags.DEFINE_bool("compile", False, "torch.compile the model (faster steps on GPU after a compile pause).")
flags.DEFINE_integer("target_dim", 0, "sam_distill: regress the k leading principal axes of the normalised teacher embeddings "
                     "(a PCA fitted on train, kept in the checkpoint) instead of all D; the model must output k "
                     "(--levels_encoder_dim=k, or no levels encoder when k = --patch_dim). 0: all D (the reference).")
flags.DEFINE_bool("embeds_in_memory", False, "sam_distill: read every teacher embedding (and transformed image) once at "
                  "start-up instead of once per item and epoch, and compute the train targets once (the toy set: 0.5 GB "
                  "in float16; Imagenette at D = 256: about 3 GB).")
flags.DEFINE_bool("compile_column_nets", False, "torch.compile only the column nets (most of a CPU step; tens of seconds to "
                  "compile, where --compile takes minutes): pays on runs of a few hundred steps or more.")
flags.DEFINE_list("keep_checkpoints_at", [], "Training: also keep checkpoints/epoch-<N>.ckpt after each of these epochs "
                  "(e.g. 10,30,100: one run read at several budgets; use with --scheduler=constant).")
