// The optimisation loop shared by both tasks, on one process or as one rank of several;
// train(), the public entry.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <mutex>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/types.h>  // before clip_grad.h, which uses torch::Tensor without including it
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/version.h>

#include "core/errors.h"
#include "core/hash.h"
#include "pipeline/prefetch.h"
#include "pipeline/train_common.h"

namespace prefixcap {
namespace training {
namespace fs = std::filesystem;

namespace {

// bfloat16 autocast on one device type for the life of the scope (the forward pass): matrix
// products and convolutions in bf16, reductions and the loss in fp32; parameters, gradients and
// the optimizer stay fp32, so no loss scaling is needed (fp16 would need it). The setting before
// is restored. LibTorch 2.4 replaced the per-device functions by device-type arguments.
class AutocastScope {
 public:
  AutocastScope(const at::Device& device, bool enabled) : cuda_(device.is_cuda()), enabled_(enabled) {
    if (!enabled_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    const at::DeviceType type = cuda_ ? at::kCUDA : at::kCPU;
    was_enabled_ = at::autocast::is_autocast_enabled(type);
    was_dtype_ = at::autocast::get_autocast_dtype(type);
    at::autocast::set_autocast_dtype(type, at::kBFloat16);
    at::autocast::set_autocast_enabled(type, true);
#else
    was_enabled_ = cuda_ ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
    was_dtype_ = cuda_ ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
    if (cuda_) {
      at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
      at::autocast::set_enabled(true);
    } else {
      at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
      at::autocast::set_cpu_enabled(true);
    }
#endif
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    const at::DeviceType type = cuda_ ? at::kCUDA : at::kCPU;
    at::autocast::set_autocast_enabled(type, was_enabled_);
    at::autocast::set_autocast_dtype(type, was_dtype_);
#else
    if (cuda_) {
      at::autocast::set_enabled(was_enabled_);
      at::autocast::set_autocast_gpu_dtype(was_dtype_);
    } else {
      at::autocast::set_cpu_enabled(was_enabled_);
      at::autocast::set_autocast_cpu_dtype(was_dtype_);
    }
#endif
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool cuda_, enabled_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

bool better(const std::string& metric, double a, double b) {
  if (std::isnan(b)) return true;
  return metric == "loss" ? a < b : a > b;
}

void replace_dir(const std::function<void(const std::string&)>& save, const fs::path& dst) {
  const fs::path tmp = dst.string() + ".partial";
  fs::remove_all(tmp);
  save(tmp.string());
  fs::remove_all(dst);
  fs::rename(tmp, dst);
}

// The generator's state as bytes, and back.
std::string cpu_rng_state() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  at::Tensor s = gen.get_state().contiguous();
  return std::string(static_cast<const char*>(s.data_ptr()), static_cast<size_t>(s.numel()));
}

void set_cpu_rng_state(const at::Tensor& state) {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state.to(at::kCPU).contiguous());
}

}  // namespace

std::unique_ptr<Communicator> connect(TrainConfig& c, Dist* dist) {
  const DistEnv env = DistEnv::from_environment();
  if (!env.distributed()) return nullptr;
  // Each rank its own GPU: "cuda" means this rank's local one.
  if (c.device == "cuda") c.device = "cuda:" + std::to_string(env.local_rank);
  const at::Device device = train_device(c);
  std::string backend = c.dist_backend;
  if (backend == "auto") backend = device.is_cuda() ? "nccl" : "gloo";
  if (backend == "nccl" && !device.is_cuda()) throw ConfigError("dist_backend nccl needs device cuda; CPU training uses gloo");
  auto comm = Communicator::create(env, backend, std::chrono::seconds(c.dist_timeout));
  dist->comm = comm.get();
  dist->rank = env.rank;
  dist->world = env.world_size;
  if (dist->main())
    std::fprintf(stderr, "distributed: %d ranks (%s), backend %s, rendezvous %s:%d\n", env.world_size, env.launcher.c_str(),
                 backend.c_str(), env.master_addr.c_str(), env.master_port);
  return comm;
}

TrainResult run_loop(const TrainConfig& c, Task& task, const TrainHooks& hooks, const Dist& dist) {
  if (dist.main()) fs::create_directories(c.out);
  dist.barrier();
  Progress progress(c.progress, dist.main());
  JsonLog log((fs::path(c.out) / "train_log.jsonl").string());
  // One optimizer step = grad_accum global batches; a global batch = batch_size examples per rank.
  const int64_t global_batch = c.batch_size * dist.world;
  const int64_t batches_per_epoch = (task.num_examples + global_batch - 1) / global_batch;
  const int64_t steps_per_epoch = (batches_per_epoch + c.grad_accum - 1) / c.grad_accum;
  const int64_t total_steps = c.max_steps > 0 ? std::min(c.max_steps, c.epochs * steps_per_epoch) : c.epochs * steps_per_epoch;
  const at::Device device = train_device(c);

  if (dist.active()) {  // every rank must be running the same training on the same data
    const auto ids = dist.gather(hash_hex(json_dump(run_identity(c)) + "|" + std::to_string(task.num_examples)));
    for (int r = 1; r < dist.world; ++r)
      if (ids[static_cast<size_t>(r)] != ids[0])
        throw ConfigError("rank " + std::to_string(r) + " runs another configuration or dataset than rank 0 (every rank needs the same options and data)");
  }

  auto groups = task.param_groups();
  std::vector<torch::optim::OptimizerParamGroup> pg;
  pg.emplace_back(groups[0], std::make_unique<torch::optim::AdamWOptions>(
                                 torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay)));
  if (groups.size() > 1 && !groups[1].empty())
    pg.emplace_back(groups[1], std::make_unique<torch::optim::AdamWOptions>(
                                   torch::optim::AdamWOptions(c.encoder_lr > 0 ? c.encoder_lr : c.lr).weight_decay(c.weight_decay)));
  torch::optim::AdamW opt(pg, torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));
  std::vector<at::Tensor> all_params;
  for (const auto& g : groups) all_params.insert(all_params.end(), g.begin(), g.end());

  CheckpointState st;
  st.world_size = dist.world;
  if (c.resume) {
    auto dir = latest_checkpoint(c);
    if (!dir) {
      progress.print("resume: no checkpoint in " + (fs::path(c.out) / "checkpoints").string() + ", starting from scratch");
    } else {
      TensorMap tensors;
      st = load_checkpoint(c, *dir, &tensors, opt);
      task.load_state(tensors, *dir + "/model.safetensors");
      // Each rank its own random state; a rank the checkpoint's run did not have keeps its seed's.
      const std::string mine = "rng.cpu." + std::to_string(dist.rank);
      if (tensors.count(mine)) set_cpu_rng_state(tensors.at(mine));
      else if (dist.rank == 0 && tensors.count("rng.cpu")) set_cpu_rng_state(tensors.at("rng.cpu"));  // older checkpoints
      if (dist.main()) log.truncate_after(st.step);
      progress.print("resumed from " + *dir + " (step " + std::to_string(st.step) + ", epoch " + std::to_string(st.epoch + 1) + ")");
      if (st.world_size != dist.world)
        progress.print("resume: the checkpoint's run had " + std::to_string(st.world_size) + " rank(s), this one " +
                       std::to_string(dist.world) + ": the epoch continues at example " + std::to_string(st.example) + " of " +
                       std::to_string(task.num_examples) + " with global batches of " + std::to_string(global_batch) +
                       "; the schedule now ends at step " + std::to_string(total_steps));
      st.world_size = dist.world;
    }
  } else if (fs::exists(fs::path(c.out) / "checkpoints" / "latest")) {
    throw ConfigError(c.out + " already holds a training run: pass --resume to continue it, or choose another --out");
  } else if (dist.main()) {
    log.truncate_after(-1);
  }
  // Every rank starts from rank 0's trainable weights and buffers.
  if (dist.active()) {
    std::vector<at::Tensor> shared = all_params;
    if (task.buffers)
      for (auto& b : task.buffers()) shared.push_back(b);
    dist.broadcast_from_main(shared);
  }
  if (st.step == 0 && !c.resume && dist.main())
    log.write({{"type", "start"}, {"step", 0}, {"config", c.to_json()}, {"time", now_iso()}, {"examples", task.num_examples},
               {"total_steps", total_steps}, {"world_size", dist.world}});

  TrainResult result;
  result.last_loss = st.last_loss;
  auto checkpoint = [&](const CheckpointState& s) {
    // Every rank's generator (nothing draws after initialisation today; saved so that a resumed
    // run stays equal if something, dropout or sampling, ever does). Rank 0 writes.
    const auto states = dist.gather(cpu_rng_state());
    if (!dist.main()) return;
    TensorMap tensors = task.state();
    for (size_t r = 0; r < states.size(); ++r) {
      at::Tensor t = at::empty({static_cast<int64_t>(states[r].size())}, at::kByte);
      std::memcpy(t.data_ptr(), states[r].data(), states[r].size());
      tensors["rng.cpu." + std::to_string(r)] = t;
    }
    save_checkpoint(c, tensors, opt, s, hooks.on_checkpoint_write);
  };
  auto t_start = std::chrono::steady_clock::now();
  int64_t samples_since = 0, steps_this_run = 0, examples_this_run = 0;
  auto t_last = t_start;
  const int64_t comm_bytes_start = dist.comm ? dist.comm->payload_bytes() : 0;
  bool finished = st.step >= total_steps;

  for (int64_t epoch = st.epoch; epoch < c.epochs && !finished; ++epoch) {
    task.begin_epoch(epoch, progress);
    task.train_mode(true);
    const std::vector<int64_t> order = epoch_order(task.num_examples, c.seed, epoch);
    const int64_t first_example = epoch == st.epoch ? st.example : 0;
    const int64_t first_batch = epoch == st.epoch ? st.batch : 0;
    const int64_t batches_left = (task.num_examples - first_example + global_batch - 1) / global_batch;
    const int64_t epoch_batches = first_batch + batches_left;
    auto example_after = [&](int64_t batches_done) {
      return std::min(task.num_examples, first_example + (batches_done - first_batch) * global_batch);
    };
    // The gradients every rank sums: the parameters that train this epoch.
    std::unique_ptr<GradientSync> sync;
    if (dist.active()) {
      std::vector<at::Tensor> trainable;
      for (const auto& p : all_params)
        if (p.requires_grad()) trainable.push_back(p);
      sync = std::make_unique<GradientSync>(*dist.comm, trainable, c.dist_bucket_mb << 20, c.dist_overlap);
    }
    // Global batch i of the epoch is order[lo, lo + global_batch); each rank takes its block of it
    // (rank_span), so the ranks together see what one process with the global batch would.
    OrderedPrefetcher<Batch> loader(
        batches_left,
        [&](int64_t i) {
          const int64_t lo = first_example + i * global_batch, hi = std::min(task.num_examples, lo + global_batch);
          const Span mine = rank_span(hi - lo, dist.rank, dist.world);
          if (mine.size() == 0) return Batch{};
          return task.make_batch(std::vector<int64_t>(order.begin() + lo + mine.lo, order.begin() + lo + mine.hi));
        },
        static_cast<int>(c.workers), c.prefetch);
    bool reached_end = false;
    for (int64_t b = first_batch; b < epoch_batches;) {
      const int64_t group_start = b - (b % c.grad_accum);
      const int64_t group_end = std::min(group_start + c.grad_accum, epoch_batches);
      std::vector<Batch> group;
      std::vector<double> counts = {0, 0};  // counted tokens, examples: over all ranks
      std::vector<int64_t> tokens;
      for (; b < group_end; ++b) {
        group.push_back(std::move(*loader.next()));
        tokens.push_back(group.back().examples.empty() ? 0 : task.tokens(group.back()));
        counts[0] += static_cast<double>(tokens.back());
        counts[1] += static_cast<double>(group.back().examples.size());
      }
      dist.sum(counts);
      // The loss of the step is the mean over every counted token of its batches on every rank,
      // so that k batches of B on n ranks are one batch of k*n*B.
      const double step_tokens = std::max(counts[0], 1.0);
      std::vector<double> loss_sum = {0};
      for (size_t k = 0; k < group.size(); ++k) {
        if (sync) sync->prepare(k + 1 == group.size());
        if (group[k].examples.empty()) continue;  // this rank has no share of the batch
        at::Tensor loss;
        {
          const AutocastScope autocast(device, c.precision == "bf16");  // the forward only
          loss = task.loss(group[k]).to(at::kFloat);
        }
        const double value = loss.item<double>();
        if (!std::isfinite(value))
          throw std::runtime_error("the loss became " + std::to_string(value) + " at step " + std::to_string(st.step + 1) +
                                   " (lower --lr, or check the data)");
        (loss * (static_cast<double>(tokens[k]) / step_tokens)).backward();
        loss_sum[0] += value * static_cast<double>(tokens[k]);
      }
      if (sync) sync->finish();
      dist.sum(loss_sum);
      const double step_loss = loss_sum[0] / step_tokens;
      const int64_t step_examples = static_cast<int64_t>(counts[1]);

      const double lr = learning_rate(c, st.step, total_steps);
      for (size_t g = 0; g < opt.param_groups().size(); ++g) {
        auto& o = static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[g].options());
        o.lr(g == 0 ? lr : lr * (c.encoder_lr > 0 ? c.encoder_lr : c.lr) / c.lr);
      }
      double grad_norm = NAN;  // of the summed gradient: the same on every rank
      if (c.clip_grad_norm > 0) grad_norm = torch::nn::utils::clip_grad_norm_(all_params, c.clip_grad_norm);
      opt.step();
      opt.zero_grad();
      if (dist.active() && task.buffers) {  // BatchNorm statistics: rank 0's (as DDP's broadcast_buffers)
        const auto buffers = task.buffers();
        dist.broadcast_from_main(buffers);
      }
      ++st.step;
      ++steps_this_run;
      st.last_loss = step_loss;
      result.last_loss = step_loss;
      samples_since += step_examples;
      examples_this_run += step_examples;
      reached_end = b == epoch_batches;
      const auto now = std::chrono::steady_clock::now();
      const double elapsed = std::chrono::duration<double>(now - t_start).count();
      const double eta = elapsed / steps_this_run * (total_steps - st.step);
      if (dist.main() && (st.step % c.log_every == 0 || st.step == total_steps || reached_end)) {
        const double dt = std::chrono::duration<double>(now - t_last).count();
        Json rec = {{"type", "train"}, {"step", st.step}, {"epoch", epoch + 1}, {"loss", step_loss}, {"lr", lr},
                    {"samples_per_s", samples_since / std::max(dt, 1e-9)}, {"elapsed_s", elapsed}};
        if (!std::isnan(grad_norm)) rec["grad_norm"] = grad_norm;
        if (dist.active()) {  // all collectives' payload (gradients, token counts, buffers), and the gradients'
          rec["comm_bytes_per_step"] = static_cast<double>(dist.comm->payload_bytes() - comm_bytes_start) / static_cast<double>(steps_this_run);
          rec["grad_bytes_per_step"] = sync->bytes_per_step();
          rec["grad_buckets"] = sync->num_buckets();
        }
        log.write(rec);
        if (!progress.tty()) {
          char line[256];
          std::snprintf(line, sizeof line, "epoch %lld/%lld step %lld/%lld  loss %.4f  lr %.2e  %.1f samples/s  ETA %s",
                        (long long)(epoch + 1), (long long)c.epochs, (long long)st.step, (long long)total_steps, step_loss, lr,
                        samples_since / std::max(dt, 1e-9), format_duration(eta).c_str());
          progress.print(line);
        }
        samples_since = 0;
        t_last = now;
      }
      if (progress.tty()) {
        char line[256];
        const double rate = static_cast<double>(examples_this_run) / std::max(elapsed, 1e-9);
        std::snprintf(line, sizeof line, "epoch %lld/%lld %s %lld/%lld  loss %.4f  lr %.2e  %.1f samples/s  ETA %s",
                      (long long)(epoch + 1), (long long)c.epochs, bar(double(st.step) / total_steps).c_str(), (long long)st.step,
                      (long long)total_steps, step_loss, lr, rate, format_duration(eta).c_str());
        progress.update(line);
      }
      if (hooks.on_step) hooks.on_step(st.step, st.last_loss);
      if (st.step >= total_steps) finished = true;
      const bool periodic = c.save_every_steps > 0 && st.step % c.save_every_steps == 0;
      // Inside an epoch: a periodic checkpoint, or the last one when max_steps stops the run there.
      if (!reached_end && (finished || periodic)) {
        CheckpointState s = st;
        s.epoch = epoch;
        s.batch = b;
        s.example = example_after(b);
        checkpoint(s);
      }
      if (finished) break;
    }
    progress.done();
    // End of the epoch (or of the run): validate, pick the best, checkpoint.
    task.train_mode(false);
    Json metrics = task.validate ? task.validate(epoch, progress) : Json();
    if (dist.main() && !metrics.is_null() && !metrics.empty()) {
      Json rec = {{"type", "val"}, {"step", st.step}, {"epoch", epoch + 1}};
      rec.update(metrics);
      log.write(rec);
      if (metrics.contains(c.best_metric) && metrics[c.best_metric].is_number()) {
        const double v = metrics[c.best_metric].get<double>();
        if (better(c.best_metric, v, st.best)) {
          st.best = v;
          st.best_epoch = epoch + 1;
          replace_dir(task.save_output, fs::path(c.out) / "best");
          progress.print("best " + c.best_metric + " so far (" + std::to_string(v) + "): saved " + (fs::path(c.out) / "best").string());
        }
      }
    }
    if (reached_end) {
      CheckpointState s = st;
      s.epoch = epoch + 1;
      s.batch = 0;
      s.example = 0;
      checkpoint(s);
    }
  }
  task.train_mode(false);
  const fs::path final_dir = fs::path(c.out) / task.output_name;
  if (dist.main()) {
    replace_dir(task.save_output, final_dir);
    log.write({{"type", "end"}, {"step", st.step}, {"output", final_dir.string()}, {"time", now_iso()}});
    progress.print("saved " + final_dir.string());
  }
  dist.barrier();  // every rank returns once the output is complete
  result.steps = st.step;
  result.bundle = final_dir.string();
  if (st.best_epoch > 0) {
    result.best = (fs::path(c.out) / "best").string();
    result.best_metrics = {{c.best_metric, st.best}, {"epoch", st.best_epoch}};
  }
  return result;
}

}  // namespace training

TrainResult train(const TrainConfig& config, const TrainHooks& hooks) {
  config.validate();
  TrainConfig c = config;
  training::Dist dist;
  auto comm = training::connect(c, &dist);
  if (c.task == "lm") return training::train_lm(c, hooks, dist);
  return training::train_caption(c, hooks, dist);
}

}  // namespace prefixcap
