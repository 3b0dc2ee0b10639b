//! Choosing the next token: greedy, or temperature with top-k and top-p, from a seeded generator
//! (the same seed and logits give the same tokens).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Sampling parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); above 0 divides the logits before softmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (None: all).
    pub top_p: Option<f32>,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// A sampler: parameters plus the random generator's state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// Checks the parameters and seeds the generator.
    pub fn new(params: SamplingParams) -> Result<Self> {
        if !params.temperature.is_finite() || params.temperature < 0.0 {
            return Err(Error::Request(format!(
                "temperature must be a finite number ≥ 0, not {}",
                params.temperature
            )));
        }
        if params.top_k == Some(0) {
            return Err(Error::Request("top-k must be at least 1".into()));
        }
        if let Some(p) = params.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::Request(format!("top-p must be in (0, 1], not {p}")));
        }
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Picks a token id from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Request("no logits to sample from".into()));
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(Error::Request("the model produced NaN logits".into()));
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        // Candidates sorted by logit, largest first (ties: lower id first).
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.params.top_k {
            c.truncate(k.min(c.len()));
        }
        let t = self.params.temperature;
        let max = c[0].1 / t;
        let mut probs: Vec<f32> = c.iter().map(|&(_, l)| (l / t - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(top_p) = self.params.top_p {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return Ok(c[i].0);
            }
        }
        Ok(c[probs.len() - 1].0)
    }
}

/// Index of the largest value; ties go to the lowest index.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampler(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        })
        .unwrap()
    }

    #[test]
    fn greedy_takes_the_largest_and_the_lowest_id_on_ties() {
        let mut s = sampler(0.0, None, None, 1);
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
    }

    #[test]
    fn bad_parameters_and_nan_logits_are_errors() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_k: Some(0),
                ..Default::default()
            },
            SamplingParams {
                top_p: Some(0.0),
                ..Default::default()
            },
            SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(p).is_err());
        }
        assert!(
            sampler(1.0, None, None, 0)
                .sample(&[0.0, f32::NAN])
                .is_err()
        );
        assert!(sampler(1.0, None, None, 0).sample(&[]).is_err());
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // logits ln(1), ln(3): token 1 should come up about 75% of the time.
        let mut s = sampler(1.0, None, None, 7);
        let logits = [0.0f32, 3f32.ln()];
        let ones = (0..20_000)
            .filter(|_| s.sample(&logits).unwrap() == 1)
            .count();
        let frac = ones as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    proptest! {
        #[test]
        fn same_seed_same_tokens(seed in any::<u64>(), logits in prop::collection::vec(-10f32..10.0, 1..50),
                                 t in 0.1f32..2.0, k in 1usize..60, p in 0.05f32..=1.0) {
            let mut a = sampler(t, Some(k), Some(p), seed);
            let mut b = sampler(t, Some(k), Some(p), seed);
            for _ in 0..8 {
                prop_assert_eq!(a.sample(&logits).unwrap(), b.sample(&logits).unwrap());
            }
        }

        #[test]
        fn top_k_and_top_p_only_pick_allowed_tokens(seed in any::<u64>(), logits in prop::collection::vec(-10f32..10.0, 1..50),
                                                    k in 1usize..10, p in 0.05f32..=1.0) {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let mut s = sampler(1.0, Some(k), None, seed);
            let allowed = &order[..k.min(order.len())];
            for _ in 0..8 {
                let t = s.sample(&logits).unwrap() as usize;
                prop_assert!(allowed.contains(&t));
            }
            // top-p: the kept set is the shortest prefix reaching p.
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let probs: Vec<f32> = order.iter().map(|&i| (logits[i] - max).exp()).collect();
            let sum: f32 = probs.iter().sum();
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q / sum;
                if acc >= p { keep = i + 1; break; }
            }
            let mut s = sampler(1.0, None, Some(p), seed);
            for _ in 0..8 {
                let t = s.sample(&logits).unwrap() as usize;
                // a rounding difference can move the boundary by one token
                prop_assert!(order[..(keep + 1).min(order.len())].contains(&t));
            }
        }
    }
}
