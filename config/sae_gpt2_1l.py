# A sparse autoencoder on GPT-2-1L's MLP neurons: the paper's post-hoc baseline, with the authors' SAE recipe.
# Sources: crate-lm/crate-lm arthursae/sae/utils.py (get_cfg, loss_fn, train_step), sae/main.py (the training loop),
# sae/model.py (init, resampling), sae/script_for_training.py (the runs' overrides). Where we differ: sae.py.
# Train the base first: python train.py config/gpt2_1l.py; then: python sae.py config/sae_gpt2_1l.py
out_dir = 'out-sae-gpt2-1l'
dataset = 'pile'
base = 'out-gpt2-1l'
layer = 0
expansion = 16                     # d_sae = 16 x d_in: 8,192 features on 512 neurons (script_for_training: 128*4*16)
l1 = 8e-5                          # l1_lambda (script_for_training), on sum_i |f_i| averaged over tokens (loss_fn)
learning_rate = 4e-4               # lr (get_cfg, script_for_training)
beta1 = 0.9                        # Adam betas (get_cfg); no weight decay, no clipping (train_step)
beta2 = 0.999
batch_size = 4                     # 4 x 1024 = 4,096 activations per step (get_cfg: batch_size, seq_len)
block_size = 1024
min_lr = 4e-5                      # lr x sched_lr_factor 0.1 (get_cfg): where each cosine warm-up starts
warmup_iters = 1000                # sched_epochs = sched_warmup_epochs = 1000: a half cosine from 4e-5 up to 4e-4,
                                   # at the start and after every resampling (main.py, resample_neurons), then constant
buffer = 2**19                     # buffer_size: activations shuffled together (activation_training_order 'shuffled')
resample_at = '10000,20000,50000,75000,100000'# resample_sae_neurons_at
resample_window = 7500             # anthropic_resample_last: firing is counted over the last 7,500 steps before one
dead_freq = 1e-6                   # resample_sae_neurons_cutoff (the authors lower it to 1e-7 from step 25,000)
resample_seqs = 60000              # anthropic_resample_batches: sequences scored for the new directions
max_iters = 125000                 # the authors set num_tokens = 2e12 and stopped by hand; the last resampling is at
                                   # 100,000: 25,000 more steps let it settle (512M activations in all). Our choice.
eval_interval = 500                # test_every
eval_iters = 20
